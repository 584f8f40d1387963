//! The I/O layer of one worker: a thread, its io_uring, its listener and
//! receive buffers. It turns ring completions into session events and the
//! session's transport requests into ring ops; all connection logic lives
//! in the session (`session/`), which holds no ring.
//!
//! A turn: wait on the ring (timeout = the session's next deadline) →
//! hand each completion to the session in order → `Session::end_turn` →
//! shutdown step → give the receive buffers back.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnse_backend::{Backend, Io};
use cnse_ring::{cqueue, opcode, squeue, types, BufRing, Completion, Ring, RingConfig, Tag};

use crate::io_modes::{send_entry, FixedSend, PlainRecvBufs, RecvMode, SendMode, ZcPending};
use crate::session::{Session, SWEEP_INTERVAL};
use crate::transport::{ConnRef, Transport};
use crate::{Config, Shared, WorkerCounters};

cnse_ring::op_kinds! {
    /// The worker's ring ops. Connection ops carry a slot tag (connection
    /// slot and generation); backend ops a wide tag (the backend's own).
    enum Op { Accept = 1, Recv = 2, Send = 3, Wake = 4, Backend = 5, Cancel = 6 }
}

const BGID: u16 = 0;
/// How long teardown waits for the kernel to return cancelled ops.
const TEARDOWN_LIMIT: Duration = Duration::from_secs(2);

fn tag(op: Op, slot: u32, gen: u32) -> Tag {
    Tag::slot(op.code(), slot, gen)
}

/// Wakes a worker blocked in its ring wait (shutdown).
pub(crate) struct Waker(OwnedFd);

impl Waker {
    pub fn new() -> io::Result<(Waker, OwnedFd)> {
        // SAFETY: eventfd(2) with valid flags; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor; dup gives the worker its own.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let dup = owned.try_clone()?;
        Ok((Waker(owned), dup))
    }

    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an eventfd.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// Queues a ring op of the worker.
///
/// # Safety
/// What `entry` points at stays in place until its last completion
/// (connection buffers are not touched while their op is in flight; the
/// backend promised the same through `Io::submit`; teardown drains before
/// anything is freed).
unsafe fn push(ring: &mut Ring, entry: squeue::Entry, tag: Tag) {
    // SAFETY: forwarded to the caller's contract.
    if let Err(e) = unsafe { ring.push(entry, tag) } {
        // Only a kernel failure (ENOMEM, EFAULT) gets here: the full-queue
        // path is inside `Ring::push`.
        panic!("worker ring refused a submission: {e}");
    }
}

/// The session's transport on the worker's ring.
pub(crate) struct RingIo {
    ring: Ring,
    now: Instant,
    recv_mode: RecvMode,
    send_mode: SendMode,
    /// `RecvMode::Plain`'s buffers (no slots otherwise).
    plain: PlainRecvBufs,
    /// The fixed send modes' registered buffers (none otherwise).
    fixed: FixedSend,
}

impl Io for RingIo {
    fn now(&self) -> Instant {
        self.now
    }

    unsafe fn submit(&mut self, tag: u64, entry: squeue::Entry) {
        assert!(tag <= cnse_ring::WIDE_MAX, "backend tag above 56 bits");
        // SAFETY: the backend's contract (`Io::submit`) is `push`'s.
        unsafe { push(&mut self.ring, entry, Tag::wide(Op::Backend.code(), tag)) };
    }
}

impl Transport for RingIo {
    fn recv(&mut self, c: ConnRef) {
        if self.recv_mode == RecvMode::Plain {
            let buf = self.plain.get_mut(c.slot);
            let e = opcode::Recv::new(types::Fd(c.fd), buf.as_mut_ptr(), buf.len() as u32).build();
            // SAFETY: the slot's buffer is boxed, never freed while the
            // worker runs, and not read until this RECV completes (the
            // session keeps one receive per connection).
            unsafe { push(&mut self.ring, e, tag(Op::Recv, c.slot, c.gen)) };
            return;
        }
        let e = opcode::RecvMulti::new(types::Fd(c.fd), BGID).build();
        // SAFETY: the buffers are the ring's provided buffers; the session
        // closes the fd only once the connection has no op in flight.
        unsafe { push(&mut self.ring, e, tag(Op::Recv, c.slot, c.gen)) };
    }

    fn cancel_recv(&mut self, c: ConnRef) {
        let e = opcode::AsyncCancel::new(tag(Op::Recv, c.slot, c.gen).raw()).build();
        // SAFETY: a cancel points at no memory.
        unsafe { push(&mut self.ring, e, tag(Op::Cancel, c.slot, c.gen)) };
    }

    unsafe fn send(&mut self, c: ConnRef, data: &[u8]) {
        // SEND_ZC's "until the completion" is the notification: `dispatch`
        // reports the send done only then.
        let zc = self.send_mode.is_zc();
        let e = if self.send_mode.is_fixed() {
            // SAFETY: forwarded: `data` stays until the completion.
            unsafe { self.fixed.entry(c, data, zc) }
        } else {
            send_entry(c.fd, data, zc)
        };
        // SAFETY: the caller keeps `data` in place until the completion; a
        // registered buffer stays lent until then (`FixedSend::release`).
        unsafe { push(&mut self.ring, e, tag(Op::Send, c.slot, c.gen)) };
    }

    fn shutdown(&mut self, fd: RawFd) {
        // SAFETY: fd is the connection's open socket; shutdown makes the
        // kernel complete our pending recv/send so the slot can be released.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }

    fn close(&mut self, fd: RawFd) {
        // SAFETY: no op of ours refers to fd any more (the session closes
        // only released connections; teardown drains first).
        unsafe { libc::close(fd) };
    }
}

struct Worker {
    session: Session<RingIo>,
    bufs: BufRing,
    /// By [`Front`]: each listener and whether its multishot accept is live.
    listeners: [Listener; 3],
    next_accept_retry: Instant,
    wake_fd: OwnedFd,
    wake_buf: Box<u64>,
    shared: Arc<Shared>,
    index: usize,
    cqes: Vec<Completion>,
    /// SEND_ZC results waiting for their notification (`SendMode::Zc`).
    zc: ZcPending,
    /// Until when the worker polls instead of blocking (`Config::busy_poll`).
    poll_until: Instant,
    /// When the request metrics are next copied for `/metrics`.
    next_metrics: Instant,
}

/// What a listener serves. Its index is the slot of its accept's tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Front {
    Binary = 0,
    Http = 1,
    Metrics = 2,
}

const FRONTS: [Front; 3] = [Front::Binary, Front::Http, Front::Metrics];

struct Listener {
    fd: Option<OwnedFd>,
    armed: bool,
}

/// A worker's end of the process's scheduler, and the eventfd that wakes
/// it (shutdown, and other cores' results, cancels and grants).
pub(crate) struct Sched {
    pub tasks: Arc<crate::tasks::Tasks>,
    pub core: cnse_sched::Core<crate::tasks::Task>,
    pub wake_fd: OwnedFd,
}

/// A worker's listening sockets (none on a worker that only runs stolen
/// work: `Config::accept_threads`).
pub(crate) struct Listeners {
    pub binary: Option<OwnedFd>,
    /// The HTTP front's (`Config::http_listen`).
    pub http: Option<OwnedFd>,
    /// The metrics-only listener's (`Config::metrics_listen`).
    pub metrics: Option<OwnedFd>,
}

pub(crate) fn run(
    index: usize,
    cfg: Arc<Config>,
    shared: Arc<Shared>,
    listener: Listeners,
    sched: Sched,
    factory: Arc<dyn cnse_backend::BackendFactory>,
    ready: Sender<Result<(), crate::ServerError>>,
) -> io::Result<()> {
    if cfg.pin_threads {
        // Best effort: a thread that cannot be pinned still serves.
        let _ = cnse_ring::pin_current_thread(index);
    }
    // Built on its own thread: backends may hold thread-bound resources
    // (a GPU context, a ring-driven connection pool).
    let backend = match factory.build(index) {
        Ok(b) => b,
        Err(message) => {
            let _ = ready.send(Err(crate::ServerError::Backend { core: index, message }));
            return Ok(());
        }
    };
    let mut worker = match Worker::new(index, cfg, shared, listener, sched, backend) {
        Ok(w) => w,
        Err(e) => {
            let _ = ready.send(Err(crate::ServerError::Ring(io::Error::new(e.kind(), e.to_string()))));
            return Err(e);
        }
    };
    {
        // GET /metrics on any worker reports the whole process.
        let shared = worker.shared.clone();
        worker.session.metrics = Some(Box::new(move |out: &mut Vec<u8>| {
            let requests: Vec<_> = shared
                .request_metrics
                .iter()
                .map(|m| *m.lock().unwrap_or_else(|e| e.into_inner()))
                .collect();
            crate::metrics::render(out, &crate::counters_of(&shared), &requests)
        }));
    }
    let _ = ready.send(Ok(()));
    drop(ready);
    let result = worker.run();
    if let Some(st) = worker.session.stage_times() {
        let st = std::mem::take(st);
        worker
            .shared
            .stage_times
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(st);
    }
    if !worker.teardown() {
        // The kernel still holds ops that point into the worker's buffers:
        // leak them rather than free memory it may write into.
        std::mem::forget(worker);
    }
    result
}

impl Worker {
    fn new(
        index: usize,
        cfg: Arc<Config>,
        shared: Arc<Shared>,
        listener: Listeners,
        sched: Sched,
        backend: Box<dyn Backend>,
    ) -> io::Result<Self> {
        let entries = 4096u32;
        let ring = Ring::new(RingConfig {
            entries,
            cq_factor: 4,
            single_issuer: cfg.defer_taskrun,
            batch_wait: cfg.batch_wait,
            ..RingConfig::default()
        })
        .map_err(|e| io::Error::new(e.source.kind(), e.to_string()))?;
        let bufs = BufRing::new(&ring, BGID, cfg.recv_buffers, cfg.recv_buffer_bytes)?;
        let now = Instant::now();
        let conns_max = cfg.conns_per_thread_max.min(cnse_ring::SLOT_MAX as usize);
        let plain_slots = if cfg.recv_mode == RecvMode::Plain { conns_max } else { 0 };
        let zc_slots = if cfg.send_mode.is_zc() { conns_max } else { 0 };
        let fixed = FixedSend::new(
            &ring,
            cfg.send_mode,
            conns_max,
            cfg.send_fixed_buffers,
            cfg.send_fixed_bytes,
        )?;
        let io = RingIo {
            fixed,
            ring,
            now,
            recv_mode: cfg.recv_mode,
            send_mode: cfg.send_mode,
            plain: PlainRecvBufs::new(plain_slots, cfg.recv_buffer_bytes as usize),
        };
        Ok(Worker {
            session: Session::with_tasks(cfg, backend, io, now, conns_max, sched.tasks, sched.core),
            bufs,
            listeners: [listener.binary, listener.http, listener.metrics].map(|fd| Listener { fd, armed: false }),
            next_accept_retry: now,
            wake_fd: sched.wake_fd,
            wake_buf: Box::new(0),
            shared,
            index,
            cqes: Vec::with_capacity(entries as usize * 4),
            zc: ZcPending::new(zc_slots),
            poll_until: now,
            next_metrics: now,
        })
    }

    fn ring(&mut self) -> &mut Ring {
        &mut self.session.io.ring
    }

    fn run(&mut self) -> io::Result<()> {
        for f in FRONTS {
            self.arm_accept(f);
        }
        self.arm_wake();
        let mut turn_start = Instant::now();
        loop {
            if let Some(st) = self.session.stage_times() {
                let t = Instant::now();
                st.turn_busy.record(t - turn_start);
                st.submitted(t);
                turn_start = t;
            }
            self.wait()?;
            let now = Instant::now();
            if let Some(st) = self.session.stage_times() {
                st.turn_wait.record(now - turn_start);
                st.turn_events.record_us(self.cqes.len() as u64);
                turn_start = now;
            }
            self.session.io.now = now;
            self.session.begin_turn(now);
            if !self.cqes.is_empty() {
                self.poll_until = now + self.session.cfg().busy_poll;
            }
            for i in 0..self.cqes.len() {
                let c = self.cqes[i];
                self.dispatch(c);
            }
            self.session.end_turn();
            if !self.session.is_shutting_down() && now >= self.next_accept_retry {
                // EMFILE/ENFILE ended a multishot accept: retry as
                // descriptors free up.
                for f in FRONTS {
                    if !self.listeners[f as usize].armed {
                        self.arm_accept(f);
                    }
                }
            }
            let done = self.shutdown_step();
            self.bufs.publish();
            if done {
                // Teardown's enter hands this turn's last sends over.
                self.session.submitting(Instant::now());
                return Ok(());
            }
            self.publish_counters();
            if now >= self.next_metrics {
                self.next_metrics = now + SWEEP_INTERVAL;
                self.publish_paused();
                let m = self.session.request_metrics();
                *self.shared.request_metrics[self.index]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = m;
            }
        }
    }

    /// Waits for completions until the session's next deadline; a turn that
    /// is already due still runs the kernel's deferred task work, so
    /// receives keep coming while the backend is busy.
    fn wait(&mut self) -> io::Result<()> {
        let now = Instant::now();
        let mut timeout = if now < self.poll_until {
            Duration::ZERO
        } else {
            self.session.next_deadline().saturating_duration_since(now)
        };
        // About to sleep with a free backend slot: say so, so that a core
        // that queues work wakes this one to steal it; work queued already
        // is taken at once.
        let idle = !timeout.is_zero() && self.session.has_capacity() && !self.session.is_shutting_down();
        if idle && self.session.tasks().going_idle(self.index) {
            timeout = Duration::ZERO;
            self.session.allow_steal();
        }
        self.cqes.clear();
        let ring = &mut self.session.io.ring;
        let r = ring
            .turn(Some(timeout), &mut self.cqes)
            .map_err(|e| io::Error::new(e.source.kind(), e.to_string()));
        if idle {
            self.session.tasks().awake(self.index);
            // Woken from an idle sleep (maybe by a core that queued work).
            self.session.allow_steal();
        }
        r
    }

    fn dispatch(&mut self, c: Completion) {
        let (slot, gen) = (c.tag.slot_index(), c.tag.gen());
        match Op::from_code(c.tag.kind()) {
            Some(Op::Recv) if self.session.io.recv_mode == RecvMode::Plain => {
                if c.result > 0 {
                    // Out of the transport for the call (a move, no copy):
                    // the session reads it while it may submit other ops
                    // (not this slot's RECV: that waits for on_recv_done).
                    let buf = self.session.io.plain.take(slot);
                    let n = (c.result as usize).min(buf.len());
                    self.session.on_input(slot, gen, &buf[..n]);
                    self.session.io.plain.put(slot, buf);
                }
                // Single-shot: the session arms the next one.
                self.session.on_recv_done(slot, gen, c.result.min(1), false);
            }
            Some(Op::Recv) => {
                if c.result > 0 {
                    let bid = c.buffer().expect("a successful buffer-select recv names its buffer");
                    // Handled in place, then the buffer goes straight back
                    // to the ring: no connection ever holds one (a slow
                    // reader cannot starve the others of receive buffers).
                    self.session.on_input(slot, gen, self.bufs.get(bid, c.result as usize));
                    self.bufs.recycle(bid);
                } else if let Some(b) = c.buffer() {
                    self.bufs.recycle(b);
                }
                self.session.on_recv_done(slot, gen, c.result.min(1), c.more());
            }
            Some(Op::Accept) => self.on_accept(FRONTS[slot as usize], c),
            Some(Op::Send) if self.session.io.send_mode.is_zc() => {
                if cqueue::notif(c.flags) {
                    // The kernel let go of the buffer.
                    self.session.io.fixed.release(slot);
                    if let Some(r) = self.zc.release(slot) {
                        self.session.on_send_done(slot, gen, r);
                    }
                } else if c.more() {
                    self.zc.hold(slot, c.result);
                } else {
                    self.session.io.fixed.release(slot);
                    self.session.on_send_done(slot, gen, c.result);
                }
            }
            Some(Op::Send) => {
                self.session.io.fixed.release(slot);
                self.session.on_send_done(slot, gen, c.result);
            }
            Some(Op::Wake) => {
                self.session.on_wake();
                // Stays armed through shutdown: foreign work may still be
                // running for other cores, and their cancels wake it.
                self.arm_wake();
            }
            Some(Op::Backend) => self.session.on_backend(c.tag.wide_value(), c.result, c.flags),
            Some(Op::Cancel) => {}
            None => unreachable!("tag {:#x} was not built by this worker", c.tag.raw()),
        }
    }

    fn on_accept(&mut self, front: Front, c: Completion) {
        if !c.more() {
            self.listeners[front as usize].armed = false;
        }
        if c.result >= 0 {
            let fd = c.result;
            crate::listen::set_nodelay(fd);
            match front {
                Front::Binary => self.session.on_accept(fd),
                Front::Http => self.session.on_accept_http(fd),
                Front::Metrics => self.session.on_accept_metrics(fd),
            };
        }
        if !self.listeners[front as usize].armed && !self.session.is_shutting_down() {
            if c.result == -libc::EMFILE || c.result == -libc::ENFILE {
                self.next_accept_retry = self.session.now() + SWEEP_INTERVAL;
            } else {
                self.arm_accept(front);
            }
        }
    }

    fn arm_accept(&mut self, front: Front) {
        let Some(l) = &self.listeners[front as usize].fd else {
            return;
        };
        let e = opcode::AcceptMulti::new(types::Fd(l.as_raw_fd())).build();
        // SAFETY: the listener stays open until teardown has drained.
        unsafe { push(self.ring(), e, tag(Op::Accept, front as u32, 0)) };
        self.listeners[front as usize].armed = true;
    }

    fn arm_wake(&mut self) {
        let buf = (&mut *self.wake_buf as *mut u64).cast();
        let e = opcode::Read::new(types::Fd(self.wake_fd.as_raw_fd()), buf, 8).build();
        // SAFETY: wake_buf is boxed (it does not move) and the eventfd stays
        // open until teardown has drained.
        unsafe { push(self.ring(), e, tag(Op::Wake, 0, 0)) };
    }

    /// Drives shutdown; true when the worker may exit.
    fn shutdown_step(&mut self) -> bool {
        let requested = self.shared.shutdown.load(Ordering::SeqCst);
        let was = self.session.is_shutting_down();
        let sessions_done = self.session.shutdown_step(requested);
        if !was && self.session.is_shutting_down() {
            for f in FRONTS {
                if self.listeners[f as usize].armed {
                    let e = opcode::AsyncCancel::new(tag(Op::Accept, f as u32, 0).raw()).build();
                    // SAFETY: a cancel points at no memory.
                    unsafe { push(self.ring(), e, tag(Op::Cancel, 0, 0)) };
                }
            }
        }
        // An accept that races the cancel is closed by teardown.
        sessions_done
    }

    fn publish_counters(&self) {
        let c: &WorkerCounters = &self.shared.counters[self.index];
        let n = self.session.counters();
        c.conns_open.store(n.conns_open, Ordering::Relaxed);
        c.conns_accepted.store(n.accepted, Ordering::Relaxed);
        c.streams_open.store(n.streams_open, Ordering::Relaxed);
        c.backend_active.store(self.session.backend_active(), Ordering::Relaxed);
        c.requests.store(n.requests, Ordering::Relaxed);
        c.tokens_sent.store(n.tokens_sent, Ordering::Relaxed);
        c.tokens_produced.store(n.tokens_produced, Ordering::Relaxed);
        c.frames_in.store(n.frames_in, Ordering::Relaxed);
        c.frames_out.store(n.frames_out, Ordering::Relaxed);
        c.violations.store(n.violations, Ordering::Relaxed);
        c.rejected.store(n.rejected, Ordering::Relaxed);
        c.ran_local.store(n.ran_local, Ordering::Relaxed);
        c.stolen_in.store(n.stolen_in, Ordering::Relaxed);
        c.stolen_out.store(n.stolen_out, Ordering::Relaxed);
    }

    /// The paused-work gauge, with the request metrics (not every turn:
    /// a backend may count it by walking its tables).
    fn publish_paused(&self) {
        let c: &WorkerCounters = &self.shared.counters[self.index];
        c.backend_paused.store(self.session.backend_paused(), Ordering::Relaxed);
    }

    /// Cancels and drains every op in flight, then closes descriptors and
    /// unregisters the receive buffers: nothing is freed while the kernel
    /// may still write into it. False when the kernel did not let go.
    fn teardown(&mut self) -> bool {
        self.publish_counters();
        self.publish_paused();
        self.cqes.clear();
        let ring = &mut self.session.io.ring;
        let left = ring.teardown(TEARDOWN_LIMIT, &mut self.cqes).unwrap_or(u64::MAX);
        for c in &self.cqes {
            if Op::from_code(c.tag.kind()) == Some(Op::Accept) && c.result >= 0 {
                // Accepted after the session closed its doors: nobody owns it.
                self.session.io.close(c.result);
            }
        }
        if left != 0 {
            tracing::error!(
                worker = self.index,
                ops = left,
                "ring ops still in flight at exit: their buffers are leaked, not freed"
            );
            return false;
        }
        self.session.close_all();
        for l in &mut self.listeners {
            drop(l.fd.take());
        }
        self.bufs.unregister(&self.session.io.ring);
        self.session.io.fixed.unregister(&self.session.io.ring);
        if self.session.io.fixed.fallbacks > 0 {
            tracing::info!(
                worker = self.index,
                sends = self.session.io.fixed.fallbacks,
                "sends that found every registered buffer lent went from the session's buffer"
            );
        }
        true
    }
}
