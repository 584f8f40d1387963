//! The llama-server backend: one request's life, top to bottom.
//!
//! `start` → [`route`](LlamaBackend::route) picks the healthy llama-server
//! with the fewest requests in flight (over all cores) and reserves one of
//! its in-flight places → a pooled connection slot of that server is reused
//! (keep-alive) or a socket is opened and CONNECTed → the request is SENT →
//! RECV is armed; each completion feeds the [`ResponseDecoder`], each SSE
//! event becomes `sink.tokens`, the last one `sink.end` → the rest of the
//! response is drained and the connection goes back to the pool.
//!
//! A connection slot has at most one ring operation in flight, and its
//! buffers live in a boxed slice that is never resized: the kernel owns the
//! memory of an in-flight operation until its completion, even after a
//! cancel ([`Conn::Cancelling`] waits for it before CLOSE). Cancelled,
//! failed and timed-out streams never reuse their connection: closing it is
//! what tells llama-server to stop generating.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use cnse_backend::{Backend, BackendStats, Delivery, Io, Job, Reject, Sink, WorkId};

use crate::body::write_completion_body;
use crate::http::{self, Item, Limits, ResponseDecoder};
use crate::op::{self, OpKind, SockAddr};
use crate::sse::{self, SseLine};
use crate::{LlamaConfig, Shared};

/// The socket of a slot and the one operation in flight on it, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    /// No socket.
    Closed,
    Connecting(RawFd),
    Sending(RawFd),
    Receiving(RawFd),
    /// Connected, nothing in flight: an idle pooled connection, or a paused
    /// stream that does not read so that TCP backpressure pauses the server.
    Ready(RawFd),
    /// `op` was cancelled and is still owned by the kernel; CLOSE follows
    /// its completion.
    Cancelling {
        fd: RawFd,
        op: OpKind,
    },
    Closing,
}

impl Conn {
    fn in_flight(self) -> Option<OpKind> {
        match self {
            Conn::Closed | Conn::Ready(_) => None,
            Conn::Connecting(_) => Some(OpKind::Connect),
            Conn::Sending(_) => Some(OpKind::Send),
            Conn::Receiving(_) => Some(OpKind::Recv),
            Conn::Cancelling { op, .. } => Some(op),
            Conn::Closing => Some(OpKind::Close),
        }
    }
}

/// What a slot's connection is doing.
#[derive(Debug)]
enum Task {
    None,
    Stream(Work),
    /// The stream ended (END delivered); the rest of the response is read so
    /// that the connection can be reused.
    Drain,
    Health,
}

#[derive(Debug)]
struct Work {
    id: WorkId,
    phase: Phase,
    paused: bool,
    /// Buffered bytes wait to be processed at the next `poll` (resume has no
    /// sink to deliver them to).
    wake: bool,
    /// Sent on a pooled connection: a close before any answer byte is the
    /// server dropping an idle connection, not a failure (retried once).
    reused: bool,
    retried: bool,
    got_bytes: bool,
    /// Tokens delivered.
    delivered: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    AwaitHead,
    Streaming,
    /// A non-200 answer: its first body line becomes the error message.
    ErrorBody(u16),
}

/// One pooled connection of one llama-server, with its own buffers.
struct Slot {
    upstream: usize,
    conn: Conn,
    task: Task,
    /// Holds one of the server's in-flight places (released once the
    /// connection is idle or closed).
    reserved: bool,
    send: Vec<u8>,
    sent: usize,
    recv: Box<[u8]>,
    recv_len: usize,
    recv_pos: usize,
    dec: ResponseDecoder,
    keep_alive: bool,
    deadline: Option<Instant>,
}

/// Counters beyond [`BackendStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LlamaStats {
    /// Requests sent on a reused keep-alive connection.
    pub reused: u64,
    /// Requests re-sent on a fresh connection after a pooled one was found
    /// closed by the server.
    pub retried: u64,
    /// Times a llama-server was marked down (failure or health check).
    pub evicted: u64,
    /// Times a health check found a down llama-server healthy again.
    pub readmitted: u64,
    pub health_checks: u64,
    pub timeouts: u64,
}

pub struct LlamaBackend {
    cfg: LlamaConfig,
    shared: Arc<[Shared]>,
    /// CONNECT reads these while in flight: boxed once, never moved.
    addrs: Box<[SockAddr]>,
    /// Stream slots of upstream `u` are `u*per_upstream..(u+1)*per_upstream`;
    /// the health slot of `u` is `stream_slots + u`.
    slots: Box<[Slot]>,
    per_upstream: usize,
    stream_slots: usize,
    by_id: HashMap<WorkId, usize>,
    health_owner: bool,
    next_health: Box<[Option<Instant>]>,
    round_robin: usize,
    body_scratch: Vec<u8>,
    stats: BackendStats,
    llama: LlamaStats,
}

impl LlamaBackend {
    pub(crate) fn new(cfg: LlamaConfig, shared: Arc<[Shared]>, health_owner: bool) -> Self {
        let upstreams = shared.len();
        // The in-flight limit is global, so one core may hold all of a
        // server's places: each core gets that many slots per server.
        let per_upstream = cfg.inflight_per_backend;
        let stream_slots = upstreams * per_upstream;
        assert!(stream_slots + upstreams <= op::SLOTS_MAX);
        let limits = Limits {
            head_bytes_max: 16 * 1024,
            line_bytes_max: cfg.event_bytes_max,
        };
        let mk = |upstream, recv_bytes| Slot {
            upstream,
            conn: Conn::Closed,
            task: Task::None,
            reserved: false,
            send: Vec::with_capacity(4096),
            sent: 0,
            recv: vec![0u8; recv_bytes].into_boxed_slice(),
            recv_len: 0,
            recv_pos: 0,
            dec: ResponseDecoder::new(limits),
            keep_alive: false,
            deadline: None,
        };
        let mut slots = Vec::with_capacity(stream_slots + upstreams);
        for u in 0..upstreams {
            for _ in 0..per_upstream {
                slots.push(mk(u, cfg.recv_buffer_bytes));
            }
        }
        for u in 0..upstreams {
            slots.push(mk(u, 4096));
        }
        let addrs = shared.iter().map(|s| SockAddr::new(s.target.addr)).collect();
        Self {
            by_id: HashMap::with_capacity(stream_slots),
            next_health: vec![None; upstreams].into_boxed_slice(),
            cfg,
            shared,
            addrs,
            slots: slots.into_boxed_slice(),
            per_upstream,
            stream_slots,
            health_owner,
            round_robin: 0,
            body_scratch: Vec::with_capacity(4096),
            stats: BackendStats::default(),
            llama: LlamaStats::default(),
        }
    }

    pub fn llama_stats(&self) -> LlamaStats {
        self.llama
    }

    /// Whether llama-server `index` (in URL order) is currently admitted.
    pub fn is_healthy(&self, index: usize) -> bool {
        self.shared[index].healthy.load(Ordering::Acquire)
    }

    /// Requests in flight to llama-server `index`, over all cores.
    pub fn inflight(&self, index: usize) -> usize {
        self.shared[index].inflight.load(Ordering::Acquire)
    }

    /// Picks the healthy server with the fewest requests in flight and
    /// reserves a place on it. `Err` is the reject for the stream.
    fn route(&mut self) -> Result<usize, Reject> {
        let n = self.shared.len();
        let limit = self.cfg.inflight_per_backend;
        let mut any_healthy = false;
        // A few rounds: another core may take the last place between the
        // look and the reservation.
        for _ in 0..4 {
            let mut best: Option<(usize, usize)> = None;
            for k in 0..n {
                let u = (self.round_robin + k) % n;
                let s = &self.shared[u];
                if !s.healthy.load(Ordering::Acquire) {
                    continue;
                }
                any_healthy = true;
                let inflight = s.inflight.load(Ordering::Acquire);
                if inflight < limit && best.is_none_or(|(_, b)| inflight < b) {
                    best = Some((u, inflight));
                }
            }
            let Some((u, _)) = best else { break };
            let reserved = self.shared[u]
                .inflight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| (v < limit).then_some(v + 1))
                .is_ok();
            if reserved {
                self.round_robin = (u + 1) % n;
                return Ok(u);
            }
        }
        if any_healthy {
            Err(Reject::new(
                429,
                "all llama-server backends are at their in-flight limit",
            ))
        } else {
            Err(Reject::new(
                502,
                format!("no healthy llama-server backend ({n} configured)"),
            ))
        }
    }

    fn release(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if slot.reserved {
            slot.reserved = false;
            let prev = self.shared[slot.upstream].inflight.fetch_sub(1, Ordering::AcqRel);
            assert!(prev > 0, "in-flight count underflow");
        }
    }

    /// Releases the slot's place once it holds no work and its connection
    /// is idle or gone.
    fn settle(&mut self, i: usize) {
        let slot = &self.slots[i];
        if matches!(slot.task, Task::None) && matches!(slot.conn, Conn::Closed | Conn::Ready(_)) {
            self.release(i);
        }
    }

    fn url(&self, i: usize) -> &str {
        &self.shared[self.slots[i].upstream].target.url
    }

    fn mark_down(&mut self, upstream: usize) {
        if self.shared[upstream].healthy.swap(false, Ordering::AcqRel) {
            self.llama.evicted += 1;
        }
    }

    fn mark_up(&mut self, upstream: usize) {
        if !self.shared[upstream].healthy.swap(true, Ordering::AcqRel) {
            self.llama.readmitted += 1;
        }
    }

    // ---- ring operations -------------------------------------------------

    fn open_connect(&mut self, i: usize, io: &mut dyn Io) -> std::io::Result<()> {
        let slot = &mut self.slots[i];
        assert_eq!(slot.conn, Conn::Closed);
        let addr = &self.addrs[slot.upstream];
        let fd = op::socket(addr)?;
        slot.conn = Conn::Connecting(fd);
        slot.deadline = Some(io.now() + self.cfg.connect_timeout);
        slot.sent = 0;
        slot.recv_len = 0;
        slot.recv_pos = 0;
        slot.dec.reset();
        if let Task::Stream(w) = &mut slot.task {
            w.phase = Phase::Connecting;
        }
        // SAFETY: the address lives in `self.addrs`, a boxed slice that is
        // neither resized nor dropped while an operation is in flight (Drop
        // leaks it then).
        unsafe { io.submit(op::tag(i, OpKind::Connect), op::connect(fd, addr)) };
        Ok(())
    }

    fn submit_send(&mut self, i: usize, io: &mut dyn Io) {
        let slot = &mut self.slots[i];
        let fd = match slot.conn {
            Conn::Ready(fd) => fd,
            other => unreachable!("send on a connection in state {other:?}"),
        };
        assert!(slot.sent < slot.send.len());
        slot.conn = Conn::Sending(fd);
        // SAFETY: `send` is not touched until this SEND completes (the slot
        // is in `Sending`, and the slot array is never moved or dropped
        // while an operation is in flight).
        unsafe { io.submit(op::tag(i, OpKind::Send), op::send(fd, &slot.send[slot.sent..])) };
    }

    fn arm_recv(&mut self, i: usize, io: &mut dyn Io) {
        let slot = &mut self.slots[i];
        let Conn::Ready(fd) = slot.conn else {
            unreachable!("recv armed on a connection in state {:?}", slot.conn)
        };
        debug_assert_eq!(slot.recv_pos, slot.recv_len, "unprocessed bytes would be overwritten");
        slot.recv_len = 0;
        slot.recv_pos = 0;
        slot.conn = Conn::Receiving(fd);
        // SAFETY: `recv` is not read or written until this RECV completes
        // (the slot is in `Receiving`); the slot array stays put.
        unsafe { io.submit(op::tag(i, OpKind::Recv), op::recv(fd, &mut slot.recv)) };
    }

    /// Ends the slot's connection without reusing it: cancels the operation
    /// in flight (CLOSE follows its completion) or closes right away.
    fn abort_conn(&mut self, i: usize, io: &mut dyn Io) {
        let slot = &mut self.slots[i];
        slot.deadline = None;
        match slot.conn {
            Conn::Closed | Conn::Closing | Conn::Cancelling { .. } => {}
            Conn::Ready(fd) => {
                slot.conn = Conn::Closing;
                // SAFETY: CLOSE references no memory.
                unsafe { io.submit(op::tag(i, OpKind::Close), op::close(fd)) };
            }
            Conn::Connecting(fd) | Conn::Sending(fd) | Conn::Receiving(fd) => {
                let op = slot.conn.in_flight().expect("an operation is in flight");
                slot.conn = Conn::Cancelling { fd, op };
                // SAFETY: ASYNC_CANCEL references no memory; the fd stays
                // open until the cancelled operation has completed.
                unsafe { io.submit(op::tag(i, OpKind::Cancel), op::cancel_fd(fd)) };
            }
        }
    }

    // ---- stream outcomes -------------------------------------------------

    /// Fails the slot's stream: one ERROR, connection closed.
    fn fail(&mut self, i: usize, code: u32, message: &str, down: bool, io: &mut dyn Io, sink: &mut dyn Sink) {
        let task = std::mem::replace(&mut self.slots[i].task, Task::None);
        if let Task::Stream(w) = task {
            self.by_id.remove(&w.id);
            self.stats.failed += 1;
            let full = format!("{message} ({})", self.url(i));
            sink.error(w.id, code, &full);
        }
        if down {
            self.mark_down(self.slots[i].upstream);
        }
        self.abort_conn(i, io);
        self.settle(i);
    }

    /// The connection failed under the slot's current task.
    fn conn_failed(&mut self, i: usize, what: String, down: bool, io: &mut dyn Io, sink: &mut dyn Sink) {
        match &mut self.slots[i].task {
            Task::Stream(w) if w.reused && !w.got_bytes && !w.retried => {
                // The server closed the pooled connection while idle: send
                // again on a fresh one once this one is closed.
                w.retried = true;
                w.reused = false;
                self.llama.retried += 1;
                self.abort_conn(i, io);
            }
            Task::Stream(w) => {
                let msg = if w.delivered > 0 {
                    format!("llama-server failed mid-stream after {} tokens: {what}", w.delivered)
                } else {
                    format!("llama-server failed: {what}")
                };
                self.fail(i, 502, &msg, down, io, sink);
            }
            Task::Health => {
                self.slots[i].task = Task::None;
                self.mark_down(self.slots[i].upstream);
                self.abort_conn(i, io);
            }
            Task::Drain | Task::None => {
                self.slots[i].task = Task::None;
                self.abort_conn(i, io);
                self.settle(i);
            }
        }
    }

    /// The connection is closed: go on with the slot's task.
    fn after_close(&mut self, i: usize, io: &mut dyn Io, sink: &mut dyn Sink) {
        if let Task::Stream(_) = self.slots[i].task {
            // A retry on a fresh connection.
            if let Err(e) = self.open_connect(i, io) {
                self.fail(i, 502, &format!("socket: {e}"), false, io, sink);
            }
            return;
        }
        self.slots[i].task = Task::None;
        self.settle(i);
    }

    /// Runs the decoder over the received bytes and acts on each item.
    fn process(&mut self, i: usize, io: &mut dyn Io, sink: &mut dyn Sink) {
        loop {
            let slot = &mut self.slots[i];
            if let Task::Stream(w) = &slot.task {
                if w.paused {
                    slot.deadline = None;
                    return;
                }
            }
            let input = &slot.recv[slot.recv_pos..slot.recv_len];
            let (used, item) = match slot.dec.next(input) {
                Ok(r) => r,
                Err(e) => {
                    slot.recv_pos = slot.recv_len;
                    let what = format!("bad HTTP response: {e}");
                    return self.conn_failed(i, what, true, io, sink);
                }
            };
            slot.recv_pos += used;
            match item {
                Item::Pending => {
                    debug_assert_eq!(slot.recv_pos, slot.recv_len);
                    return self.need_more(i, io);
                }
                Item::Head(head) => {
                    slot.keep_alive = head.keep_alive;
                    match &mut slot.task {
                        Task::Health => {
                            let upstream = slot.upstream;
                            slot.task = Task::None;
                            if head.status == 200 {
                                self.mark_up(upstream);
                            } else {
                                self.mark_down(upstream);
                            }
                            self.abort_conn(i, io);
                            return;
                        }
                        Task::Stream(w) => {
                            if head.status != 200 {
                                w.phase = Phase::ErrorBody(head.status);
                            } else if !head.event_stream {
                                let msg = "answered 200 without a text/event-stream body";
                                return self.fail(i, 502, msg, true, io, sink);
                            } else {
                                w.phase = Phase::Streaming;
                            }
                        }
                        Task::Drain | Task::None => {}
                    }
                }
                Item::Line => {
                    if !self.on_line(i, io, sink) {
                        return;
                    }
                }
                Item::End => return self.on_end(i, io, sink),
            }
        }
    }

    /// One body line of the slot's response. Returns false when processing
    /// must stop (the stream ended, failed or paused).
    fn on_line(&mut self, i: usize, io: &mut dyn Io, sink: &mut dyn Sink) -> bool {
        let slot = &mut self.slots[i];
        let Task::Stream(w) = &mut slot.task else {
            // Draining: the rest of an answer already ended.
            return true;
        };
        if let Phase::ErrorBody(status) = w.phase {
            let line = slot.dec.line();
            if line.is_empty() {
                return true;
            }
            let msg = sse::status_message(status, line);
            self.fail(i, 502, &msg, status >= 500, io, sink);
            return false;
        }
        let event = match sse::parse_line(slot.dec.line()) {
            Ok(SseLine::Skip) => return true,
            Ok(SseLine::Event(e)) => e,
            Ok(SseLine::Error(msg)) => {
                self.fail(i, 502, &msg, false, io, sink);
                return false;
            }
            Err(e) => {
                self.fail(i, 502, &e, true, io, sink);
                return false;
            }
        };
        let id = w.id;
        // Credit counts tokens: one sink call per token id. An event's text
        // goes with its last token (it is complete only there); text without
        // ids counts as one token.
        let count = event.token_count.max(u32::from(!event.content.is_empty()));
        for k in 0..count {
            let text = if k + 1 == count { event.content.as_bytes() } else { b"" };
            w.delivered += 1;
            match sink.token(id, text) {
                Delivery::Accepted => {}
                // The rest of this event still goes out: the stream's
                // buffer bound leaves room for one event's tokens.
                Delivery::Pause => w.paused = !event.stop,
                Delivery::Gone => {
                    self.by_id.remove(&id);
                    self.stats.cancelled += 1;
                    slot.task = Task::None;
                    self.abort_conn(i, io);
                    self.settle(i);
                    return false;
                }
            }
        }
        if count > 0 {
            slot.deadline = if w.paused {
                None
            } else {
                Some(io.now() + self.cfg.idle_token_timeout)
            };
        }
        if event.stop {
            let reason = event.finish_reason();
            self.by_id.remove(&id);
            sink.end(id, reason);
            slot.task = Task::Drain;
            slot.deadline = Some(io.now() + self.cfg.idle_token_timeout);
            return true;
        }
        !w.paused
    }

    fn on_end(&mut self, i: usize, io: &mut dyn Io, sink: &mut dyn Sink) {
        let slot = &mut self.slots[i];
        match &slot.task {
            Task::Stream(w) => {
                let msg = match w.phase {
                    Phase::ErrorBody(status) => sse::status_message(status, b""),
                    _ => "llama-server ended the response without a final event".to_string(),
                };
                let down = matches!(w.phase, Phase::ErrorBody(s) if s >= 500);
                self.fail(i, 502, &msg, down, io, sink);
            }
            Task::Drain | Task::None | Task::Health => {
                slot.task = Task::None;
                if slot.keep_alive && slot.recv_pos == slot.recv_len {
                    // Back to the pool, idle.
                    slot.dec.reset();
                    slot.deadline = Some(io.now() + self.cfg.keepalive_idle);
                    self.settle(i);
                } else {
                    self.abort_conn(i, io);
                }
            }
        }
    }

    /// The decoder wants more bytes.
    fn need_more(&mut self, i: usize, io: &mut dyn Io) {
        let slot = &self.slots[i];
        let read = match &slot.task {
            Task::Stream(w) => !w.paused,
            Task::Drain | Task::Health => true,
            Task::None => false,
        };
        if read && matches!(slot.conn, Conn::Ready(_)) {
            self.arm_recv(i, io);
        }
    }

    fn on_timeout(&mut self, i: usize, io: &mut dyn Io, sink: &mut dyn Sink) {
        self.llama.timeouts += 1;
        let slot = &self.slots[i];
        match &slot.task {
            Task::Stream(w) => {
                let (msg, down) = match w.phase {
                    Phase::Connecting => (format!("connect timed out after {:?}", self.cfg.connect_timeout), true),
                    Phase::AwaitHead | Phase::ErrorBody(_) => {
                        (format!("no answer within {:?}", self.cfg.first_token_timeout), false)
                    }
                    Phase::Streaming if w.delivered == 0 => (
                        format!("no first token within {:?}", self.cfg.first_token_timeout),
                        false,
                    ),
                    Phase::Streaming => (
                        format!(
                            "no token for {:?} after {} tokens",
                            self.cfg.idle_token_timeout, w.delivered
                        ),
                        false,
                    ),
                };
                self.fail(i, 504, &format!("llama-server timed out: {msg}"), down, io, sink);
            }
            Task::Health => {
                self.slots[i].task = Task::None;
                self.mark_down(self.slots[i].upstream);
                self.abort_conn(i, io);
            }
            Task::Drain | Task::None => {
                // A drain that does not finish, or an idle pooled
                // connection past its keep-alive: close it.
                self.slots[i].task = Task::None;
                self.abort_conn(i, io);
                self.settle(i);
            }
        }
    }

    fn start_health(&mut self, u: usize, io: &mut dyn Io) {
        let i = self.stream_slots + u;
        let slot = &mut self.slots[i];
        if !matches!(slot.task, Task::None) || slot.conn != Conn::Closed {
            return;
        }
        self.llama.health_checks += 1;
        slot.task = Task::Health;
        slot.send.clear();
        slot.send
            .extend_from_slice(&http::health_request(&self.shared[u].target.authority));
        match self.open_connect(i, io) {
            Ok(()) => self.slots[i].deadline = Some(io.now() + self.cfg.health_timeout),
            Err(_) => {
                self.slots[i].task = Task::None;
                self.mark_down(u);
            }
        }
    }

    fn slot_of(&self, id: WorkId) -> Option<usize> {
        self.by_id.get(&id).copied()
    }
}

fn errno_text(res: i32) -> String {
    std::io::Error::from_raw_os_error(-res).to_string()
}

impl Backend for LlamaBackend {
    fn name(&self) -> &str {
        "llama"
    }

    fn start(&mut self, job: Job<'_>, io: &mut dyn Io) -> Result<(), Reject> {
        if self.by_id.contains_key(&job.id) {
            return Err(Reject::new(409, "work id already running on the llama backend"));
        }
        let u = self.route()?;
        let range = u * self.per_upstream..(u + 1) * self.per_upstream;
        // An idle pooled connection first, then a closed slot.
        let idle = range
            .clone()
            .find(|&i| matches!(self.slots[i].task, Task::None) && matches!(self.slots[i].conn, Conn::Ready(_)));
        let closed = || {
            range
                .clone()
                .find(|&i| matches!(self.slots[i].task, Task::None) && self.slots[i].conn == Conn::Closed)
        };
        let Some(i) = idle.or_else(closed) else {
            // Every slot of this server on this core is still closing a
            // cancelled stream's connection.
            self.shared[u].inflight.fetch_sub(1, Ordering::AcqRel);
            return Err(Reject::new(
                429,
                "llama backend: connections of this core still closing",
            ));
        };
        debug_assert!(!self.slots[i].reserved);
        self.body_scratch.clear();
        write_completion_body(&mut self.body_scratch, &job.params, job.prompt, self.cfg.cache_prompt);
        let slot = &mut self.slots[i];
        slot.reserved = true;
        slot.send.clear();
        http::write_completion_head(
            &mut slot.send,
            &self.shared[u].target.authority,
            self.body_scratch.len(),
        );
        slot.send.extend_from_slice(&self.body_scratch);
        slot.sent = 0;
        let reused = matches!(slot.conn, Conn::Ready(_));
        slot.task = Task::Stream(Work {
            id: job.id,
            phase: Phase::AwaitHead,
            paused: false,
            wake: false,
            reused,
            retried: false,
            got_bytes: false,
            delivered: 0,
        });
        if reused {
            self.llama.reused += 1;
            slot.dec.reset();
            slot.recv_len = 0;
            slot.recv_pos = 0;
            slot.deadline = Some(io.now() + self.cfg.first_token_timeout);
            self.submit_send(i, io);
        } else if let Err(e) = self.open_connect(i, io) {
            self.slots[i].task = Task::None;
            self.release(i);
            return Err(Reject::new(502, format!("llama backend: socket: {e}")));
        }
        self.by_id.insert(job.id, i);
        self.stats.started += 1;
        Ok(())
    }

    fn cancel(&mut self, id: WorkId, io: &mut dyn Io) {
        let Some(i) = self.by_id.remove(&id) else { return };
        self.stats.cancelled += 1;
        self.slots[i].task = Task::None;
        self.abort_conn(i, io);
        self.settle(i);
    }

    fn pause(&mut self, id: WorkId) {
        let Some(i) = self.slot_of(id) else { return };
        let slot = &mut self.slots[i];
        if let Task::Stream(w) = &mut slot.task {
            w.paused = true;
            slot.deadline = None;
        }
    }

    fn resume(&mut self, id: WorkId, io: &mut dyn Io) {
        let Some(i) = self.slot_of(id) else { return };
        let slot = &mut self.slots[i];
        let Task::Stream(w) = &mut slot.task else { return };
        if !w.paused {
            return;
        }
        w.paused = false;
        slot.deadline = Some(io.now() + self.cfg.idle_token_timeout);
        if matches!(slot.conn, Conn::Ready(_)) {
            // Bytes already received may hold whole events, but there is no
            // sink here: a NOP's completion brings the slot back to
            // `complete`, which processes them and re-arms RECV.
            w.wake = true;
            // SAFETY: NOP references no memory.
            unsafe { io.submit(op::tag(i, OpKind::Wake), op::nop()) };
        }
    }

    fn complete(&mut self, tag: u64, result: i32, _flags: u32, io: &mut dyn Io, sink: &mut dyn Sink) {
        let Some((i, kind)) = op::untag(tag) else { return };
        if i >= self.slots.len() {
            return;
        }
        if kind == OpKind::Cancel {
            // Cancelling by fd needs Linux 5.19; where the kernel refuses
            // it, shutting the socket down wakes the operation instead.
            if result == -libc::EINVAL {
                if let Conn::Cancelling { fd, .. } = self.slots[i].conn {
                    // SAFETY: fd is open (CLOSE is issued only after the
                    // cancelled operation completed); shutdown touches no
                    // memory of ours.
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                }
            }
            return;
        }
        if kind == OpKind::Wake {
            // Stale when the stream ended or was replaced meanwhile: its
            // `wake` flag is then gone with it.
            let slot = &mut self.slots[i];
            if let Task::Stream(w) = &mut slot.task {
                if w.wake && matches!(slot.conn, Conn::Ready(_)) {
                    w.wake = false;
                    self.process(i, io, sink);
                }
            }
            return;
        }
        let conn = self.slots[i].conn;
        match (conn, kind) {
            (Conn::Cancelling { fd, op }, k) if k == op => {
                self.slots[i].conn = Conn::Closing;
                // SAFETY: CLOSE references no memory.
                unsafe { io.submit(op::tag(i, OpKind::Close), op::close(fd)) };
            }
            (Conn::Closing, OpKind::Close) => {
                self.slots[i].conn = Conn::Closed;
                self.after_close(i, io, sink);
            }
            (Conn::Connecting(fd), OpKind::Connect) => {
                // Nothing is in flight any more, whatever the result.
                self.slots[i].conn = Conn::Ready(fd);
                if result < 0 {
                    let what = format!("connect: {}", errno_text(result));
                    return self.conn_failed(i, what, true, io, sink);
                }
                let slot = &mut self.slots[i];
                match &mut slot.task {
                    Task::Stream(w) => {
                        w.phase = Phase::AwaitHead;
                        slot.deadline = Some(io.now() + self.cfg.first_token_timeout);
                    }
                    Task::Health => {}
                    Task::Drain | Task::None => unreachable!("connect without a task"),
                }
                self.submit_send(i, io);
            }
            (Conn::Sending(fd), OpKind::Send) => {
                self.slots[i].conn = Conn::Ready(fd);
                if result == -libc::EINTR || result == -libc::EAGAIN {
                    return self.submit_send(i, io);
                }
                if result <= 0 {
                    let what = format!("send: {}", errno_text(result.min(-libc::EPIPE)));
                    return self.conn_failed(i, what, true, io, sink);
                }
                let slot = &mut self.slots[i];
                slot.sent += result as usize;
                if slot.sent < slot.send.len() {
                    return self.submit_send(i, io);
                }
                self.arm_recv(i, io);
            }
            (Conn::Receiving(fd), OpKind::Recv) => {
                let slot = &mut self.slots[i];
                slot.conn = Conn::Ready(fd);
                if result == -libc::EINTR || result == -libc::EAGAIN || result == -libc::ENOBUFS {
                    return self.arm_recv(i, io);
                }
                if result < 0 {
                    let what = format!("recv: {}", errno_text(result));
                    return self.conn_failed(i, what, true, io, sink);
                }
                if result == 0 {
                    return self.on_eof(i, io, sink);
                }
                slot.recv_len = result as usize;
                slot.recv_pos = 0;
                if let Task::Stream(w) = &mut slot.task {
                    w.got_bytes = true;
                }
                self.process(i, io, sink);
            }
            _ => {
                // A completion that does not match the slot's state would be
                // a bookkeeping bug; dropping it is the only safe reaction.
                debug_assert!(false, "unexpected completion {kind:?} for slot {i} in {conn:?}");
            }
        }
    }

    fn poll(&mut self, io: &mut dyn Io, sink: &mut dyn Sink) -> Option<Instant> {
        let now = io.now();
        for i in 0..self.slots.len() {
            if let Task::Stream(w) = &mut self.slots[i].task {
                if w.wake {
                    w.wake = false;
                    self.process(i, io, sink);
                }
            }
        }
        if self.health_owner {
            for u in 0..self.shared.len() {
                let due = self.next_health[u].is_none_or(|t| t <= now);
                if due {
                    self.next_health[u] = Some(now + self.cfg.health_interval);
                    self.start_health(u, io);
                }
            }
        }
        let mut next: Option<Instant> = None;
        for i in 0..self.slots.len() {
            let Some(d) = self.slots[i].deadline else { continue };
            if d <= now {
                self.on_timeout(i, io, sink);
            }
            if let Some(d) = self.slots[i].deadline {
                next = Some(next.map_or(d, |n| n.min(d)));
            }
        }
        if self.health_owner {
            for t in self.next_health.iter().flatten() {
                next = Some(next.map_or(*t, |n| n.min(*t)));
            }
        }
        next
    }

    fn stats(&self) -> BackendStats {
        let paused = self
            .slots
            .iter()
            .filter(|s| matches!(&s.task, Task::Stream(w) if w.paused))
            .count() as u64;
        BackendStats {
            active: self.by_id.len() as u64,
            paused,
            ..self.stats
        }
    }

    fn has_capacity(&self) -> bool {
        let limit = self.cfg.inflight_per_backend;
        let mut any_healthy = false;
        for s in self.shared.iter() {
            if s.healthy.load(Ordering::Acquire) {
                any_healthy = true;
                if s.inflight.load(Ordering::Acquire) < limit {
                    return true;
                }
            }
        }
        // With every server down, `start` answers 502 at once rather than
        // letting requests wait in the admission queue for nothing.
        !any_healthy
    }
}

impl LlamaBackend {
    fn on_eof(&mut self, i: usize, io: &mut dyn Io, sink: &mut dyn Sink) {
        let slot = &mut self.slots[i];
        match slot.dec.eof() {
            Ok(Item::Line) => {
                // A final unterminated line of a read-until-close body.
                if self.on_line(i, io, sink) {
                    self.on_eof_end(i, io, sink);
                }
            }
            Ok(_) => self.on_eof_end(i, io, sink),
            Err(_) => {
                let what = "connection closed by llama-server".to_string();
                self.conn_failed(i, what, true, io, sink);
            }
        }
    }

    fn on_eof_end(&mut self, i: usize, io: &mut dyn Io, sink: &mut dyn Sink) {
        self.slots[i].keep_alive = false;
        self.on_end(i, io, sink);
    }
}

impl Drop for LlamaBackend {
    fn drop(&mut self) {
        let mut in_flight = false;
        for i in 0..self.slots.len() {
            self.release(i);
            match self.slots[i].conn {
                Conn::Ready(fd) => {
                    // SAFETY: nothing is in flight on this fd, which we own.
                    unsafe { libc::close(fd) };
                    self.slots[i].conn = Conn::Closed;
                }
                Conn::Closed => {}
                _ => in_flight = true,
            }
        }
        if in_flight {
            // The kernel may still write into these buffers or read the
            // addresses: leak them rather than free memory it owns.
            std::mem::forget(std::mem::replace(&mut self.slots, Box::new([])));
            std::mem::forget(std::mem::replace(&mut self.addrs, Box::new([])));
        }
    }
}
