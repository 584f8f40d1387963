//! One worker: a thread, its io_uring, its connections and streams, its
//! backend. The loop turn is: wait on the ring (with the backend's next
//! deadline as timeout) → copy the completions out → handle them in order
//! (accept, recv → frames, send, backend ops) → poll the backend → admit
//! queued work → frame every dirty connection's tokens into one send each.

use std::collections::BinaryHeap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnse_backend::{Backend, Delivery, FinishReason, Io, Job, Sink, WorkId};
use cnse_proto::{code, put_end, put_error, put_hello_ack, put_pong, put_tokens, Kind, ParamLimits, Params};
use cnse_ring::{opcode, squeue, types, BufRing, Completion, Ring, RingConfig, Tag};

use crate::auth::AuthKey;
use crate::conn::{Conn, ConnState, BACKLOG_BYTES_MAX};
use crate::stream::{Credit, Phase, Stream};
use crate::{Config, Shared, WorkerCounters};

cnse_ring::op_kinds! {
    /// The worker's ring ops. Connection ops carry a slot tag (connection
    /// slot and generation); backend ops a wide tag (the backend's own).
    enum Op { Accept = 1, Recv = 2, Send = 3, Wake = 4, Backend = 5, Cancel = 6 }
}

const BGID: u16 = 0;
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// How long teardown waits for the kernel to return cancelled ops.
const TEARDOWN_LIMIT: Duration = Duration::from_secs(2);
/// Room kept free in a send buffer for the small frames (ERROR, END) a
/// frame's handling may append.
const REPLY_SLACK_BYTES: usize = 512;

fn tag(op: Op, slot: u32, gen: u32) -> Tag {
    Tag::slot(op.code(), slot, gen)
}

fn work_id(slot: u32, gen: u32) -> WorkId {
    WorkId((u64::from(gen) << 32) | u64::from(slot))
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
/// What `entry` points at stays in place until its last completion (the
/// connection buffers are not touched while their op is in flight; the
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

struct RingIo<'a> {
    ring: &'a mut Ring,
    now: Instant,
}

impl Io for RingIo<'_> {
    fn now(&self) -> Instant {
        self.now
    }

    unsafe fn submit(&mut self, tag: u64, entry: squeue::Entry) {
        assert!(tag <= cnse_ring::WIDE_MAX, "backend tag above 56 bits");
        // SAFETY: the backend's contract (`Io::submit`) is `push`'s.
        unsafe { push(self.ring, entry, Tag::wide(Op::Backend.code(), tag)) };
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Queued {
    priority: u32,
    /// Earlier arrivals first within a priority.
    order: std::cmp::Reverse<u64>,
    slot: u32,
    gen: u32,
}

/// Connections, streams and what must be flushed: everything the backend's
/// sink touches, split from the backend itself so both can be borrowed.
struct Tables {
    cfg: Arc<Config>,
    now: Instant,
    conns: Vec<Conn>,
    conn_free: Vec<u32>,
    streams: Vec<Stream>,
    stream_free: Vec<u32>,
    dirty: Vec<u32>,
    streams_open: u64,
    conns_open: u64,
    tokens_sent: u64,
    frames_out: u64,
    frames_in: u64,
    requests: u64,
    violations: u64,
    rejected: u64,
    accepted: u64,
}

impl Tables {
    fn mark_dirty(&mut self, conn: u32) {
        let c = &mut self.conns[conn as usize];
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(conn);
        }
    }

    fn live_stream(&mut self, id: WorkId) -> Option<&mut Stream> {
        let slot = (id.0 & 0xffff_ffff) as usize;
        let gen = (id.0 >> 32) as u32;
        let s = self.streams.get_mut(slot)?;
        (s.gen == gen && s.phase == Phase::Running).then_some(s)
    }

    /// Ends a stream with ERROR `code` at the next flush (tokens not yet
    /// sent are dropped).
    fn fail(&mut self, slot: u32, code: u32, message: &str) {
        let s = &mut self.streams[slot as usize];
        s.phase = Phase::Failed;
        s.error_code = code;
        s.error_message.clear();
        s.error_message.push_str(message);
        let conn = s.conn;
        self.mark_dirty(conn);
    }

    fn free_stream(&mut self, slot: u32) {
        let s = &mut self.streams[slot as usize];
        debug_assert!(s.phase != Phase::Free);
        s.phase = Phase::Free;
        s.gen = s.gen.wrapping_add(1);
        s.queue.clear();
        s.paused = false;
        self.stream_free.push(slot);
        self.streams_open -= 1;
    }
}

impl Sink for Tables {
    fn token(&mut self, id: WorkId, text: &[u8]) -> Delivery {
        let (tokens_max, bytes_max) = (self.cfg.stream_buffered_tokens_max, self.cfg.stream_buffered_bytes_max);
        let Some(s) = self.live_stream(id) else {
            return Delivery::Gone;
        };
        s.queue.push(text);
        let full = s.queue.tokens() >= tokens_max || s.queue.bytes() >= bytes_max;
        if full {
            s.paused = true;
        }
        let conn = s.conn;
        self.mark_dirty(conn);
        if full {
            Delivery::Pause
        } else {
            Delivery::Accepted
        }
    }

    fn end(&mut self, id: WorkId, reason: FinishReason) {
        if let Some(s) = self.live_stream(id) {
            s.phase = Phase::Finished(reason);
            let conn = s.conn;
            self.mark_dirty(conn);
        }
    }

    fn error(&mut self, id: WorkId, code: u32, message: &str) {
        if self.live_stream(id).is_some() {
            self.fail((id.0 & 0xffff_ffff) as u32, code, message);
        }
    }
}

/// A worker's receive buffers and everything else, split so that frames can
/// be handled in place (borrowing `bufs`) by methods of `Core`.
struct Worker {
    core: Core,
    bufs: BufRing,
}

struct Core {
    ring: Ring,
    tables: Tables,
    backend: Box<dyn Backend>,
    queue: BinaryHeap<Queued>,
    queue_order: u64,
    limits: ParamLimits,
    auth: Option<AuthKey>,
    listener: Option<OwnedFd>,
    accept_armed: bool,
    wake_fd: OwnedFd,
    wake_buf: Box<u64>,
    shared: Arc<Shared>,
    index: usize,
    cqes: Vec<Completion>,
    next_sweep: Instant,
    shutting_down: Option<Instant>,
    backend_deadline: Option<Instant>,
}

pub(crate) fn run(
    index: usize,
    cfg: Arc<Config>,
    shared: Arc<Shared>,
    listener: OwnedFd,
    wake_fd: OwnedFd,
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
    let mut worker = match Worker::new(index, cfg, shared, listener, wake_fd, backend) {
        Ok(w) => w,
        Err(e) => {
            let _ = ready.send(Err(crate::ServerError::Ring(io::Error::new(e.kind(), e.to_string()))));
            return Err(e);
        }
    };
    let _ = ready.send(Ok(()));
    drop(ready);
    let result = worker.run();
    if !worker.core.teardown(&worker.bufs) {
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
        listener: OwnedFd,
        wake_fd: OwnedFd,
        backend: Box<dyn Backend>,
    ) -> io::Result<Self> {
        let entries = 4096u32;
        let ring = Ring::new(RingConfig {
            entries,
            cq_factor: 4,
            single_issuer: true,
        })
        .map_err(|e| io::Error::new(e.source.kind(), e.to_string()))?;
        let now = Instant::now();
        let conns_max = cfg.conns_per_thread_max.min(cnse_ring::SLOT_MAX as usize);
        let conns = (0..conns_max).map(|_| Conn::new(now, cfg.payload_bytes_max)).collect();
        let conn_free = (0..conns_max as u32).rev().collect();
        let streams = (0..cfg.streams_per_thread_max)
            .map(|_| Stream::new(now, 0, 0))
            .collect();
        let stream_free = (0..cfg.streams_per_thread_max as u32).rev().collect();
        let limits = ParamLimits {
            max_tokens_limit: cfg.max_tokens_limit,
        };
        let queue = BinaryHeap::with_capacity(cfg.admission_queue_max);
        let cfg_auth = cfg.auth_key.as_deref().map(AuthKey::new);
        let bufs = BufRing::new(&ring, BGID, cfg.recv_buffers, cfg.recv_buffer_bytes)?;
        let core = Core {
            ring,
            tables: Tables {
                cfg,
                now,
                conns,
                conn_free,
                streams,
                stream_free,
                dirty: Vec::with_capacity(1024),
                streams_open: 0,
                conns_open: 0,
                tokens_sent: 0,
                frames_out: 0,
                frames_in: 0,
                requests: 0,
                violations: 0,
                rejected: 0,
                accepted: 0,
            },
            backend,
            queue,
            queue_order: 0,
            limits,
            auth: cfg_auth,
            listener: Some(listener),
            accept_armed: false,
            wake_fd,
            wake_buf: Box::new(0),
            shared,
            index,
            cqes: Vec::with_capacity(entries as usize * 4),
            next_sweep: now + SWEEP_INTERVAL,
            shutting_down: None,
            backend_deadline: None,
        };
        Ok(Self { core, bufs })
    }

    fn run(&mut self) -> io::Result<()> {
        self.core.arm_accept();
        self.core.arm_wake();
        loop {
            self.core.wait()?;
            self.core.tables.now = Instant::now();
            for i in 0..self.core.cqes.len() {
                let c = self.core.cqes[i];
                match Op::from_code(c.tag.kind()) {
                    Some(Op::Recv) => self.on_recv(c.tag.slot_index(), c.tag.gen(), c.result, c.flags),
                    _ => self.core.dispatch(c),
                }
            }
            self.core.poll_backend();
            self.core.admit();
            self.core.flush_dirty();
            if self.core.tables.now >= self.core.next_sweep {
                self.core.sweep();
                self.core.next_sweep = self.core.tables.now + SWEEP_INTERVAL;
            }
            let done = self.core.shutdown_step();
            self.bufs.publish();
            if done {
                return Ok(());
            }
            self.core.publish_counters();
        }
    }

    fn on_recv(&mut self, slot: u32, gen: u32, result: i32, flags: u32) {
        let more = cnse_ring::cqueue::more(flags);
        let bid = cnse_ring::cqueue::buffer_select(flags);
        if result > 0 {
            let bid = bid.expect("a successful buffer-select recv names its buffer");
            // Handled in place, then the buffer goes straight back to the
            // ring: no connection ever holds one (a slow reader cannot
            // starve the others of receive buffers).
            self.core.on_input(slot, gen, self.bufs.get(bid, result as usize));
            self.bufs.recycle(bid);
        } else if let Some(b) = bid {
            self.bufs.recycle(b);
        }
        self.core.on_recv_done(slot, gen, result, more);
    }
}

impl Core {
    /// Bytes received on a connection: frames are handled in place; what
    /// cannot be handled now (output backed up) goes to the bounded backlog.
    fn on_input(&mut self, slot: u32, gen: u32, data: &[u8]) {
        let c = &mut self.tables.conns[slot as usize];
        if c.gen != gen || !c.reads_input() {
            return;
        }
        c.last_input = self.tables.now;
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
        self.maybe_cancel_recv(slot);
    }

    fn on_recv_done(&mut self, slot: u32, gen: u32, result: i32, more: bool) {
        let c = &mut self.tables.conns[slot as usize];
        if c.gen != gen || c.state == ConnState::Free {
            return;
        }
        if !more {
            c.recv_armed = false;
            if result == -libc::ECANCELED {
                c.recv_cancelling = false;
            }
        }
        if result == 0 || (result < 0 && result != -libc::ENOBUFS && result != -libc::ECANCELED) {
            // EOF or a receive error: the connection is over.
            return self.close_conn(slot);
        }
        if self.tables.conns[slot as usize].state == ConnState::Closing {
            self.maybe_release(slot);
        } else {
            // Multishot ended (ENOBUFS, cancel, or the kernel's choice):
            // re-arm unless the backlog is holding input back.
            self.arm_recv(slot);
        }
    }

    /// Handles the whole frames in `data` while the connection's output has
    /// room; returns the bytes consumed (all of them unless output backed
    /// up).
    fn consume(&mut self, slot: u32, data: &[u8]) -> usize {
        let mut input = data;
        let soft_limit = self.tables.cfg.send_buffer_bytes;
        let mut decoder = std::mem::replace(
            &mut self.tables.conns[slot as usize].decoder,
            cnse_proto::FrameDecoder::new(cnse_proto::Direction::ToServer, 0),
        );
        loop {
            let c = &self.tables.conns[slot as usize];
            if !c.reads_input() {
                input = &[];
                break;
            }
            if input.is_empty() || c.out_fill.len() > soft_limit {
                break;
            }
            match decoder.next(&mut input) {
                Ok(Some(frame)) => {
                    let h = frame.header;
                    let (stream_id, arg, aux) = (h.stream_id(), h.arg(), h.aux());
                    self.handle_frame(slot, frame.kind, stream_id, arg, aux, frame.payload);
                }
                Ok(None) => break,
                Err(v) => {
                    self.violate(slot, v.code, v.message);
                    input = &[];
                    break;
                }
            }
        }
        self.tables.conns[slot as usize].decoder = decoder;
        self.tables.mark_dirty(slot);
        data.len() - input.len()
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

    fn cfg(&self) -> &Config {
        &self.tables.cfg
    }

    fn arm_accept(&mut self) {
        if let Some(l) = &self.listener {
            let e = opcode::AcceptMulti::new(types::Fd(l.as_raw_fd())).build();
            // SAFETY: the listener stays open until teardown has drained.
            unsafe { push(&mut self.ring, e, tag(Op::Accept, 0, 0)) };
            self.accept_armed = true;
        }
    }

    fn arm_wake(&mut self) {
        let e = opcode::Read::new(
            types::Fd(self.wake_fd.as_raw_fd()),
            (&mut *self.wake_buf as *mut u64).cast(),
            8,
        )
        .build();
        // SAFETY: wake_buf is boxed (it does not move) and the eventfd stays
        // open until teardown has drained.
        unsafe { push(&mut self.ring, e, tag(Op::Wake, 0, 0)) };
    }

    fn arm_recv(&mut self, slot: u32) {
        let c = &mut self.tables.conns[slot as usize];
        if c.recv_armed || c.recv_cancelling || !c.reads_input() || !c.backlog.is_empty() {
            return;
        }
        c.recv_armed = true;
        let e = opcode::RecvMulti::new(types::Fd(c.fd), BGID).build();
        let t = tag(Op::Recv, slot, c.gen);
        // SAFETY: the buffers are the ring's provided buffers; the fd is
        // closed only once the connection has no op in flight.
        unsafe { push(&mut self.ring, e, t) };
    }

    /// Waits for completions until the sweep or the backend's next
    /// deadline; a turn that is already due still runs the kernel's
    /// deferred task work, so receives keep coming while the backend is busy.
    fn wait(&mut self) -> io::Result<()> {
        let now = Instant::now();
        let mut until = self.next_sweep;
        if let Some(d) = self.backend_deadline {
            until = until.min(d);
        }
        self.cqes.clear();
        self.ring
            .turn(Some(until.saturating_duration_since(now)), &mut self.cqes)
            .map_err(|e| io::Error::new(e.source.kind(), e.to_string()))
    }

    fn dispatch(&mut self, c: Completion) {
        let (slot, gen) = (c.tag.slot_index(), c.tag.gen());
        match Op::from_code(c.tag.kind()) {
            Some(Op::Accept) => self.on_accept(c.result, c.flags),
            Some(Op::Send) => self.on_send(slot, gen, c.result),
            Some(Op::Recv) => unreachable!("the worker handles receive completions (they carry its buffers)"),
            Some(Op::Wake) => {
                if !self.shared.shutdown.load(Ordering::SeqCst) {
                    self.arm_wake();
                }
            }
            Some(Op::Backend) => {
                let mut io = RingIo {
                    ring: &mut self.ring,
                    now: self.tables.now,
                };
                self.backend
                    .complete(c.tag.wide_value(), c.result, c.flags, &mut io, &mut self.tables);
            }
            Some(Op::Cancel) => {}
            None => unreachable!("tag {:#x} was not built by this worker", c.tag.raw()),
        }
    }

    fn on_accept(&mut self, result: i32, flags: u32) {
        if !cnse_ring::cqueue::more(flags) {
            self.accept_armed = false;
        }
        if result >= 0 {
            self.tables.accepted += 1;
            let fd = result;
            let Some(slot) = (if self.shutting_down.is_none() {
                self.tables.conn_free.pop()
            } else {
                None
            }) else {
                // Connection table full or shutting down: refuse by closing.
                // SAFETY: fd was just accepted and is owned by nobody else.
                unsafe { libc::close(fd) };
                self.tables.rejected += 1;
                return;
            };
            crate::listen::set_nodelay(fd);
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
            c.accepted = now;
            c.last_input = now;
            self.tables.conns_open += 1;
            self.arm_recv(slot);
        }
        // EMFILE/ENFILE end the multishot: the sweep re-arms it once descriptors free up.
        if !self.accept_armed && self.shutting_down.is_none() && result != -libc::EMFILE && result != -libc::ENFILE {
            self.arm_accept();
        }
    }

    fn maybe_cancel_recv(&mut self, slot: u32) {
        let c = &mut self.tables.conns[slot as usize];
        if c.backlog.len() >= BACKLOG_BYTES_MAX && c.recv_armed && !c.recv_cancelling {
            c.recv_cancelling = true;
            let e = opcode::AsyncCancel::new(tag(Op::Recv, slot, c.gen).raw()).build();
            let t = tag(Op::Cancel, slot, c.gen);
            // SAFETY: a cancel points at no memory.
            unsafe { push(&mut self.ring, e, t) };
        }
    }

    fn handle_frame(&mut self, slot: u32, kind: Kind, stream_id: u64, arg: u32, aux: u64, payload: &[u8]) {
        self.tables.frames_in += 1;
        let now = self.tables.now;
        let state = self.tables.conns[slot as usize].state;
        match (state, kind) {
            (ConnState::Handshake, Kind::Hello) => {
                let authorized = match &self.auth {
                    Some(key) => key.verify(payload),
                    None => true,
                };
                if !authorized {
                    return self.violate(slot, code::UNAUTHORIZED, "authentication failed");
                }
                let t = &mut self.tables;
                let c = &mut t.conns[slot as usize];
                c.state = ConnState::Open;
                put_hello_ack(&mut c.out_fill, t.cfg.payload_bytes_max, &t.cfg.server_name);
                t.frames_out += 1;
            }
            (ConnState::Handshake, _) => self.violate(slot, code::BAD_REQUEST, "HELLO must be the first frame"),
            (_, Kind::Hello) => self.violate(slot, code::BAD_REQUEST, "second HELLO"),
            (_, Kind::Ping) => {
                let c = &mut self.tables.conns[slot as usize];
                put_pong(&mut c.out_fill, stream_id, arg, aux, payload);
                self.tables.frames_out += 1;
            }
            (_, Kind::Request) => {
                if stream_id == 0 {
                    self.violate(slot, code::BAD_REQUEST, "REQUEST on stream 0");
                    return;
                }
                let reject = |t: &mut Tables, code: u32, msg: &str| {
                    put_error(&mut t.conns[slot as usize].out_fill, stream_id, code, msg);
                    t.frames_out += 1;
                    t.rejected += 1;
                };
                if self.tables.conns[slot as usize].find_stream(stream_id).is_some() {
                    return reject(&mut self.tables, code::STREAM_IN_USE, "stream id already in use");
                }
                let req = match Params::parse(payload, &self.limits) {
                    Ok(r) => r,
                    Err((c, m)) => return reject(&mut self.tables, c, m),
                };
                if self.shutting_down.is_some() {
                    return reject(&mut self.tables, code::SHUTTING_DOWN, "server shutting down");
                }
                if self.tables.conns[slot as usize].streams.len() >= self.tables.cfg.streams_per_conn_max {
                    return reject(
                        &mut self.tables,
                        code::OVERLOADED,
                        "too many open streams on this connection",
                    );
                }
                let run_now = self.queue.is_empty() && self.backend.has_capacity();
                if !run_now && self.queue.len() >= self.tables.cfg.admission_queue_max {
                    return reject(&mut self.tables, code::OVERLOADED, "admission queue full, retry later");
                }
                let Some(sslot) = self.tables.stream_free.pop() else {
                    return reject(&mut self.tables, code::OVERLOADED, "stream table full, retry later");
                };
                self.tables.requests += 1;
                self.tables.streams_open += 1;
                let s = &mut self.tables.streams[sslot as usize];
                s.phase = Phase::Queued;
                s.conn = slot;
                s.client_id = stream_id;
                s.credit = Credit::from_initial(arg);
                s.sent = 0;
                s.paused = false;
                s.arrived = now;
                s.first_token = None;
                s.params = req.params;
                s.prompt.clear();
                s.prompt.push_str(req.prompt);
                let gen = s.gen;
                self.tables.conns[slot as usize].streams.push((stream_id, sslot));
                if run_now {
                    self.start_stream(sslot);
                } else {
                    self.queue_order += 1;
                    self.queue.push(Queued {
                        priority: req.params.priority,
                        order: std::cmp::Reverse(self.queue_order),
                        slot: sslot,
                        gen,
                    });
                }
            }
            (_, Kind::Cancel) => {
                let Some(i) = self.tables.conns[slot as usize].find_stream(stream_id) else {
                    return;
                };
                let sslot = self.tables.conns[slot as usize].streams[i].1;
                self.stop_stream(sslot);
                let s = &self.tables.streams[sslot as usize];
                let (ttft, total) = times(s, now);
                let sent = s.sent;
                put_end(
                    &mut self.tables.conns[slot as usize].out_fill,
                    stream_id,
                    FinishReason::Cancelled,
                    sent,
                    ttft,
                    total,
                );
                self.tables.frames_out += 1;
                self.tables.conns[slot as usize].streams.swap_remove(i);
                self.tables.free_stream(sslot);
            }
            (_, Kind::Credit) => {
                let Some(i) = self.tables.conns[slot as usize].find_stream(stream_id) else {
                    return;
                };
                let sslot = self.tables.conns[slot as usize].streams[i].1;
                self.tables.streams[sslot as usize].credit.grant(arg);
                self.tables.mark_dirty(slot);
            }
            (_, Kind::HelloAck | Kind::Tokens | Kind::End | Kind::Error | Kind::Pong) => {
                unreachable!("the decoder rejects server kinds from clients")
            }
        }
    }

    fn start_stream(&mut self, sslot: u32) {
        let t = &mut self.tables;
        let s = &mut t.streams[sslot as usize];
        s.phase = Phase::Running;
        let job = Job {
            id: work_id(sslot, s.gen),
            params: s.params,
            prompt: &s.prompt,
            arrived: s.arrived,
        };
        let mut io = RingIo {
            ring: &mut self.ring,
            now: t.now,
        };
        if let Err(reject) = self.backend.start(job, &mut io) {
            t.fail(sslot, reject.code, &reject.message);
        }
    }

    /// Ends the backend's part of a stream (no frame is written).
    fn stop_stream(&mut self, sslot: u32) {
        let s = &self.tables.streams[sslot as usize];
        match s.phase {
            Phase::Running => {
                let mut io = RingIo {
                    ring: &mut self.ring,
                    now: self.tables.now,
                };
                self.backend.cancel(work_id(sslot, s.gen), &mut io);
            }
            Phase::Queued => {
                let gen = s.gen;
                self.queue.retain(|q| !(q.slot == sslot && q.gen == gen));
            }
            Phase::Finished(_) | Phase::Failed | Phase::Free => {}
        }
    }

    /// Protocol violation: ERROR on stream 0, cancel every stream (no END),
    /// send what is pending, close.
    fn violate(&mut self, slot: u32, code: u32, message: &str) {
        self.drop_streams(slot);
        let t = &mut self.tables;
        t.violations += 1;
        let c = &mut t.conns[slot as usize];
        put_error(&mut c.out_fill, 0, code, message);
        t.frames_out += 1;
        c.state = ConnState::Draining {
            deadline: t.now + DRAIN_TIMEOUT,
        };
        t.mark_dirty(slot);
    }

    fn drop_streams(&mut self, slot: u32) {
        while let Some((_, sslot)) = self.tables.conns[slot as usize].streams.pop() {
            self.stop_stream(sslot);
            self.tables.free_stream(sslot);
        }
    }

    /// Peer closed, error, or timeout: cancel the streams silently and shut
    /// the socket; the slot is released once the kernel returns our ops.
    fn close_conn(&mut self, slot: u32) {
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
        // SAFETY: fd is this connection's open socket; shutdown makes the
        // kernel complete our pending recv/send so the slot can be released.
        unsafe { libc::shutdown(c.fd, libc::SHUT_RDWR) };
        self.maybe_release(slot);
    }

    fn maybe_release(&mut self, slot: u32) {
        let c = &mut self.tables.conns[slot as usize];
        if c.state != ConnState::Closing || c.ops_in_flight() {
            return;
        }
        // SAFETY: no operation of ours refers to fd any more.
        unsafe { libc::close(c.fd) };
        c.fd = -1;
        c.gen = c.gen.wrapping_add(1);
        c.state = ConnState::Free;
        c.out_fill.clear();
        c.out_flight.clear();
        c.decoder.reset();
        self.tables.conn_free.push(slot);
        self.tables.conns_open -= 1;
    }

    fn on_send(&mut self, slot: u32, gen: u32, result: i32) {
        let c = &mut self.tables.conns[slot as usize];
        assert_eq!(c.gen, gen, "a slot is never reused while its send is in flight");
        c.send_inflight = false;
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
        self.tables.mark_dirty(slot);
    }

    fn submit_send(&mut self, slot: u32) {
        let c = &mut self.tables.conns[slot as usize];
        debug_assert!(!c.send_inflight);
        if c.flight_sent >= c.out_flight.len() {
            if c.out_fill.is_empty() {
                return;
            }
            std::mem::swap(&mut c.out_fill, &mut c.out_flight);
            c.flight_sent = 0;
        }
        let rest = &c.out_flight[c.flight_sent..];
        c.send_inflight = true;
        let e = opcode::Send::new(types::Fd(c.fd), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        let t = tag(Op::Send, slot, c.gen);
        // SAFETY: out_flight is not touched while the send is in flight
        // (send_inflight); the fd is closed only once no op is in flight.
        unsafe { push(&mut self.ring, e, t) };
    }

    fn poll_backend(&mut self) {
        let mut io = RingIo {
            ring: &mut self.ring,
            now: self.tables.now,
        };
        self.backend_deadline = self.backend.poll(&mut io, &mut self.tables);
    }

    fn admit(&mut self) {
        while let Some(top) = self.queue.peek() {
            if !self.backend.has_capacity() {
                break;
            }
            let (slot, gen) = (top.slot, top.gen);
            self.queue.pop();
            let s = &self.tables.streams[slot as usize];
            if s.gen != gen || s.phase != Phase::Queued {
                continue;
            }
            self.start_stream(slot);
        }
    }

    /// Frames buffered tokens within credit, ENDs and ERRORs, for every
    /// connection touched this turn, then one send per connection.
    fn flush_dirty(&mut self) {
        let mut i = 0;
        while i < self.tables.dirty.len() {
            let slot = self.tables.dirty[i];
            i += 1;
            self.tables.conns[slot as usize].dirty = false;
            self.flush_conn(slot);
        }
        self.tables.dirty.clear();
    }

    fn flush_conn(&mut self, slot: u32) {
        let t = &mut self.tables;
        let now = t.now;
        let soft = t.cfg.send_buffer_bytes;
        let (low_tokens, low_bytes) = (
            t.cfg.stream_buffered_tokens_max / 2,
            t.cfg.stream_buffered_bytes_max / 2,
        );
        let c = &t.conns[slot as usize];
        match c.state {
            ConnState::Open => {}
            ConnState::Draining { .. } => {
                if !c.send_inflight {
                    if c.out_fill.is_empty() && c.flight_sent >= c.out_flight.len() {
                        self.close_conn(slot);
                    } else {
                        self.submit_send(slot);
                    }
                }
                return;
            }
            ConnState::Handshake => {
                if !c.send_inflight {
                    self.submit_send(slot);
                }
                return;
            }
            ConnState::Free | ConnState::Closing => return,
        }
        let mut k = 0;
        while k < t.conns[slot as usize].streams.len() {
            let (client_id, sslot) = t.conns[slot as usize].streams[k];
            let (streams, conns) = (&mut t.streams, &mut t.conns);
            let s = &mut streams[sslot as usize];
            let out = &mut conns[slot as usize].out_fill;
            if s.phase != Phase::Failed && s.queue.tokens() > 0 && s.credit.available() > 0 {
                let room = soft.saturating_sub(out.len() + REPLY_SLACK_BYTES);
                if room > 0 || out.is_empty() {
                    let (n, text) = s.queue.take(s.credit.available(), room);
                    put_tokens(out, client_id, n, s.sent, text);
                    s.sent += u64::from(n);
                    s.credit.spend(u64::from(n));
                    if s.first_token.is_none() {
                        s.first_token = Some(now);
                    }
                    t.tokens_sent += u64::from(n);
                    t.frames_out += 1;
                }
            }
            let done = match s.phase {
                Phase::Finished(reason) if s.queue.tokens() == 0 => {
                    let (ttft, total) = times(s, now);
                    put_end(out, client_id, reason, s.sent, ttft, total);
                    true
                }
                Phase::Failed => {
                    put_error(out, client_id, s.error_code, &s.error_message);
                    true
                }
                _ => false,
            };
            if done {
                t.frames_out += 1;
                t.conns[slot as usize].streams.swap_remove(k);
                t.free_stream(sslot);
                continue;
            }
            if s.paused && s.phase == Phase::Running && s.queue.tokens() <= low_tokens && s.queue.bytes() <= low_bytes {
                s.paused = false;
                let id = work_id(sslot, s.gen);
                let mut io = RingIo {
                    ring: &mut self.ring,
                    now,
                };
                self.backend.resume(id, &mut io);
            }
            k += 1;
        }
        if !t.conns[slot as usize].send_inflight {
            self.submit_send(slot);
        }
    }

    /// Timeouts: handshake, idle, draining; re-arms accept after EMFILE.
    fn sweep(&mut self) {
        let now = self.tables.now;
        let (handshake, idle) = (self.cfg().handshake_timeout, self.cfg().idle_timeout);
        for slot in 0..self.tables.conns.len() as u32 {
            let c = &self.tables.conns[slot as usize];
            match c.state {
                ConnState::Handshake if now.duration_since(c.accepted) >= handshake => {
                    self.violate(slot, code::BAD_REQUEST, "no HELLO within the handshake timeout");
                }
                ConnState::Open if c.streams.is_empty() && now.duration_since(c.last_input) >= idle => {
                    self.close_conn(slot)
                }
                ConnState::Draining { deadline } if now >= deadline => self.close_conn(slot),
                _ => {}
            }
        }
        if !self.accept_armed && self.shutting_down.is_none() {
            self.arm_accept();
        }
        self.flush_dirty();
    }

    /// Drives shutdown; true when the worker may exit.
    fn shutdown_step(&mut self) -> bool {
        if self.shutting_down.is_none() {
            if !self.shared.shutdown.load(Ordering::SeqCst) {
                return false;
            }
            self.shutting_down = Some(self.tables.now + self.cfg().shutdown_grace);
            if self.accept_armed {
                let e = opcode::AsyncCancel::new(tag(Op::Accept, 0, 0).raw()).build();
                // SAFETY: a cancel points at no memory.
                unsafe { push(&mut self.ring, e, tag(Op::Cancel, 0, 0)) };
            }
            // Queued work will not start: tell its clients now.
            while let Some(q) = self.queue.pop() {
                let s = &self.tables.streams[q.slot as usize];
                if s.gen == q.gen && s.phase == Phase::Queued {
                    self.tables.fail(q.slot, code::SHUTTING_DOWN, "server shutting down");
                }
            }
            self.flush_dirty();
        }
        let deadline = self.shutting_down.expect("set above");
        let now = self.tables.now;
        if self.tables.streams_open == 0 || now >= deadline {
            for slot in 0..self.tables.conns.len() as u32 {
                let c = &self.tables.conns[slot as usize];
                if !matches!(c.state, ConnState::Open | ConnState::Handshake) {
                    continue;
                }
                let streams: Vec<(u64, u32)> = c.streams.clone();
                for (_, sslot) in streams {
                    self.stop_stream(sslot);
                    self.tables.fail(sslot, code::SHUTTING_DOWN, "server shutting down");
                }
                self.flush_conn(slot);
                let c = &mut self.tables.conns[slot as usize];
                c.state = ConnState::Draining {
                    deadline: now + DRAIN_TIMEOUT,
                };
                self.tables.mark_dirty(slot);
            }
            self.flush_dirty();
        }
        if self.tables.conns_open == 0 && !self.accept_armed {
            return true;
        }
        // Hard stop: nothing may keep the process from exiting.
        now >= deadline + DRAIN_TIMEOUT * 2
    }

    fn publish_counters(&self) {
        let c: &WorkerCounters = &self.shared.counters[self.index];
        let t = &self.tables;
        c.conns_open.store(t.conns_open, Ordering::Relaxed);
        c.conns_accepted.store(t.accepted, Ordering::Relaxed);
        c.streams_open.store(t.streams_open, Ordering::Relaxed);
        c.backend_active.store(self.backend.stats().active, Ordering::Relaxed);
        c.requests.store(t.requests, Ordering::Relaxed);
        c.tokens_sent.store(t.tokens_sent, Ordering::Relaxed);
        c.frames_in.store(t.frames_in, Ordering::Relaxed);
        c.frames_out.store(t.frames_out, Ordering::Relaxed);
        c.violations.store(t.violations, Ordering::Relaxed);
        c.rejected.store(t.rejected, Ordering::Relaxed);
    }

    /// Cancels and drains every op in flight, then closes descriptors and
    /// unregisters the receive buffers: nothing is freed while the kernel
    /// may still write into it.
    fn teardown(&mut self, bufs: &BufRing) -> bool {
        self.publish_counters();
        self.cqes.clear();
        let left = self.ring.teardown(TEARDOWN_LIMIT, &mut self.cqes).unwrap_or(u64::MAX);
        for c in &mut self.tables.conns {
            if c.fd >= 0 {
                // SAFETY: the ring has no op in flight on this descriptor
                // (drained above); nothing else owns it.
                unsafe { libc::close(c.fd) };
                c.fd = -1;
            }
        }
        drop(self.listener.take());
        if left != 0 {
            eprintln!("worker {}: {left} ring ops still in flight at exit", self.index);
            return false;
        }
        bufs.unregister(&self.ring);
        true
    }
}

fn times(s: &Stream, now: Instant) -> (u64, u64) {
    let ttft = s.first_token.map(|f| cnse_backend::micros(f - s.arrived)).unwrap_or(0);
    (ttft, cnse_backend::micros(now - s.arrived))
}
