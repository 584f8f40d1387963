//! The llama-server backend: one request's life, top to bottom.
//!
//! `start` → [`route`](LlamaBackend::route) picks the healthy llama-server
//! with the fewest requests in flight (over all cores) and reserves one of
//! its in-flight places → an idle connection of that server is taken (a
//! spare connected ahead, or one pooled after an answer: its watching RECV
//! is cancelled first) and a replacement spare starts connecting, or a
//! socket is opened and CONNECTed → the request is SENT →
//! RECV is armed; each completion feeds the [`ResponseDecoder`], each SSE
//! event becomes `sink.tokens`, the last one `sink.end` → the rest of the
//! response is drained and the connection goes back to the pool, watched
//! (or is closed, for a server that closes after each stream).
//!
//! A connection slot has at most one ring operation in flight, and its
//! buffers live in a boxed slice that is never resized: the kernel owns the
//! memory of an in-flight operation until its completion, even after a
//! cancel ([`Conn::Cancelling`] waits for it before CLOSE). Cancelled,
//! failed and timed-out streams never reuse their connection: closing it is
//! what tells llama-server to stop generating.
//!
//! Layout: this file holds the slot and stream types and the [`Backend`]
//! entry points; `route` picks servers and runs health checks, `pool` owns
//! the ring ops of the connection slots and their completions, `exchange`
//! turns a response into sink calls and decides how each stream ends,
//! `stats` gathers the counters [`Backend::stats`] reports.

mod affinity;
mod exchange;
mod failover;
mod pool;
mod route;
mod stats;
mod sticky;
mod upkeep;

pub use stats::LlamaStats;

use pool::Pick;

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use cnse_backend::{Backend, BackendStats, Io, Job, Reject, Sink, WorkId};

use crate::body::write_completion_body;
use crate::http::{self, Limits, ResponseDecoder};
use crate::op::{self, OpKind, SockAddr};
use crate::{LlamaConfig, Shared};

/// The socket of a slot and the one operation in flight on it, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    /// No socket.
    Closed,
    Connecting(RawFd),
    Sending(RawFd),
    Receiving(RawFd),
    /// Connected, nothing in flight: a paused stream that does not read so
    /// that TCP backpressure pauses the server, or a moment between ops.
    Ready(RawFd),
    /// A request took an idle watched connection: its watching RECV was
    /// cancelled and is still the kernel's; the SEND follows its completion.
    Reclaiming(RawFd),
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
            Conn::Receiving(_) | Conn::Reclaiming(_) => Some(OpKind::Recv),
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
    /// An idle connection, opened ahead of requests or pooled after an
    /// answer, with a RECV armed so that the server closing it is seen at
    /// once (it is then replaced, and no request is sent on it).
    Spare,
}

#[derive(Debug)]
struct Work {
    id: WorkId,
    phase: Phase,
    flow: Flow,
    attempt: Attempt,
    /// Tokens delivered.
    delivered: u64,
    /// Times the stream was sent again to another server (`failover`).
    retries: u8,
    /// Servers it was sent to (bit per URL index; `URLS_MAX` is 64).
    tried: u64,
    /// A `/completion` request (else `/v1/chat/completions`).
    completion: bool,
    /// Its session key's hash (`Route::Session`): pinned to each server
    /// it is sent to, first or again.
    session: Option<u64>,
    /// The stream's `max_tokens` as the client asked.
    max_tokens: u32,
    /// Failover: bytes of the slot's `text` (and tokens of `delivered`)
    /// already in the request body, as prompt or assistant prefill.
    folded_bytes: usize,
    folded_tokens: u64,
    /// The generated text outgrew `failover_text_bytes_max`: no failover.
    text_over: bool,
    /// A chat continuation: bytes of the assistant prefill that
    /// llama-server still has to echo at the start of its answer (they
    /// are not sent again; `failover::skip_echo`).
    echo_skip: usize,
}

/// Whether a stream's tokens may go to its sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Flowing,
    /// The client's credit ran out: nothing is read or delivered, so that
    /// TCP backpressure pauses llama-server.
    Paused,
    /// Resumed, with received bytes waiting: they are processed at the next
    /// `poll` or on the wake NOP's completion (resume has no sink to deliver
    /// them to).
    Woken,
}

/// What a close of the stream's connection means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// Sent on a pooled keep-alive connection, no answer byte yet: a close
    /// is the server having dropped the idle connection, not a failure; the
    /// request is sent again, once, on a fresh connection.
    PooledUnanswered,
    /// On a fresh connection, answered, or already retried: a close is a
    /// failure.
    Committed,
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
    /// The llama-server slot the stream was sent to (`id_slot`), held
    /// with the reservation.
    id_slot: Option<u16>,
    /// The stream's prefix as it grows with the generated text (prefix
    /// routing: the next turn of a conversation sends it back).
    growing: crate::prefix::Growing,
    /// The stream's generated text so far (with failover on; at most
    /// `failover_text_bytes_max`): a continuation's prompt is the
    /// request's prompt and this. Moves with the stream; its capacity
    /// stays with the slots, so that steady streaming allocates nothing.
    text: Vec<u8>,
    send: Vec<u8>,
    sent: usize,
    recv: Box<[u8]>,
    recv_len: usize,
    recv_pos: usize,
    dec: ResponseDecoder,
    keep_alive: bool,
    deadline: Option<Instant>,
    /// When the connection went idle: back to the pool after an answer
    /// (`keep_alive`), or connected ahead as a spare.
    idle_since: Option<Instant>,
    /// Opened ahead of requests (a spare), counted in `Shared::spares`
    /// while its task is `Task::Spare`.
    ahead: bool,
}

/// A pooled connection the server closed within this time of its last
/// answer marks the server as one that closes after every stream.
const CLOSES_AFTER_STREAM: std::time::Duration = std::time::Duration::from_secs(1);

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
    /// The current prompt's block hashes (capacity `PROMPT_BLOCKS_MAX`).
    hashes: Vec<u64>,
    /// Session key → server (`Route::Session`), and the current stream's
    /// key hash when it has a key and the policy uses it.
    sessions: Arc<crate::session::SessionTable>,
    session_hash: Option<u64>,
    stats: BackendStats,
    llama: LlamaStats,
    /// Per upstream: it closed an idle pooled connection right after its
    /// last answer, so its connections are closed after each answer
    /// rather than pooled (no request is sent on a dead connection).
    closes_after_stream: Box<[bool]>,
    /// Per upstream: no new spare before this time (its last spare failed
    /// or was closed right after its connect).
    spare_hold: Box<[Option<Instant>]>,
    /// Failover warnings: the start of the current one-second window, the
    /// lines logged in it, and those left out since the last line.
    log_window: Option<Instant>,
    log_count: u32,
    log_suppressed: u64,
    /// Per upstream: this core's share of `Shared::spares`.
    spares_mine: Box<[usize]>,
    /// What `poll` must look at again (see `upkeep`).
    upkeep: upkeep::Upkeep,
}

impl LlamaBackend {
    pub(crate) fn new(
        cfg: LlamaConfig,
        shared: Arc<[Shared]>,
        sessions: Arc<crate::session::SessionTable>,
        health_owner: bool,
    ) -> Self {
        let upstreams = shared.len();
        // The in-flight limit is global, so one core may hold all of a
        // server's places: each core gets that many slots per server, and
        // one more per spare (a spare holds no place, and a request that
        // takes one leaves a free slot for its replacement).
        let per_upstream = cfg.inflight_per_backend + cfg.spare_conns;
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
            id_slot: None,
            growing: crate::prefix::Growing::default(),
            text: Vec::new(),
            send: Vec::with_capacity(4096),
            sent: 0,
            recv: vec![0u8; recv_bytes].into_boxed_slice(),
            recv_len: 0,
            recv_pos: 0,
            dec: ResponseDecoder::new(limits),
            keep_alive: false,
            deadline: None,
            idle_since: None,
            ahead: false,
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
        let upkeep = upkeep::Upkeep::new(&cfg);
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
            hashes: Vec::with_capacity(crate::prefix::PROMPT_BLOCKS_MAX),
            sessions,
            session_hash: None,
            closes_after_stream: vec![false; upstreams].into_boxed_slice(),
            spare_hold: vec![None; upstreams].into_boxed_slice(),
            spares_mine: vec![0; upstreams].into_boxed_slice(),
            stats: BackendStats::default(),
            llama: LlamaStats::default(),
            log_window: None,
            log_count: 0,
            log_suppressed: 0,
            upkeep,
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

    fn slot_of(&self, id: WorkId) -> Option<usize> {
        self.by_id.get(&id).copied()
    }

    /// Sends `POST path` with `body_scratch` as its body on reserved
    /// connection slot `i` (as `pool::pick_slot` picked it) for `work`. On
    /// `Err` the slot is released.
    fn launch(&mut self, i: usize, pick: Pick, path: &str, mut work: Work, io: &mut dyn Io) -> std::io::Result<()> {
        let u = self.slots[i].upstream;
        let slot = &mut self.slots[i];
        debug_assert!(slot.reserved);
        slot.send.clear();
        http::write_post_head(
            &mut slot.send,
            path,
            &self.shared[u].target.authority,
            self.body_scratch.len(),
        );
        slot.send.extend_from_slice(&self.body_scratch);
        slot.sent = 0;
        // On a connection that was idle, a close before any answer byte is
        // the server having dropped it: sent again once, on a fresh one.
        let idle = pick == Pick::Watched;
        work.phase = if pick == Pick::Connecting {
            Phase::Connecting
        } else {
            Phase::AwaitHead
        };
        work.attempt = if idle {
            Attempt::PooledUnanswered
        } else {
            Attempt::Committed
        };
        let id = work.id;
        if let Some(h) = work.session {
            let pin = crate::session::Pin {
                server: u,
                slot: slot.id_slot,
            };
            self.sessions.pin(h, pin);
        }
        slot.task = Task::Stream(work);
        slot.ahead = false;
        if idle {
            if slot.keep_alive {
                self.llama.reused += 1;
            } else {
                self.llama.spares_taken += 1;
            }
            slot.dec.reset();
            slot.recv_len = 0;
            slot.recv_pos = 0;
            slot.deadline = Some(io.now() + self.cfg.first_token_timeout);
        }
        match pick {
            Pick::Watched => self.reclaim(i, io),
            // Its CONNECT's completion sends the request.
            Pick::Connecting => self.llama.spares_taken += 1,
            Pick::Closed => {
                if let Err(e) = self.open_connect(i, io) {
                    self.slots[i].task = Task::None;
                    self.release(i);
                    return Err(e);
                }
            }
        }
        // The replacement spare connects while this request is served.
        self.fill_spares(u, io);
        self.by_id.insert(id, i);
        Ok(())
    }
}

impl Backend for LlamaBackend {
    fn name(&self) -> &str {
        "llama"
    }

    fn start(&mut self, job: Job<'_>, io: &mut dyn Io) -> Result<(), Reject> {
        if self.by_id.contains_key(&job.id) {
            return Err(Reject::new(409, "work id already running on the llama backend"));
        }
        self.hash_prompt(job.chat.unwrap_or(job.prompt).as_bytes());
        self.hash_session(job.session);
        let (u, id_slot) = self.route()?;
        let Some((i, pick)) = self.pick_slot(u) else {
            // Every slot of this server on this core is still closing a
            // cancelled stream's connection.
            self.shared[u].inflight.fetch_sub(1, Ordering::AcqRel);
            if let Some(id) = id_slot {
                self.shared[u].slot_busy[usize::from(id)].store(false, Ordering::Release);
            }
            return Err(Reject::new(
                429,
                "llama backend: connections of this core still closing",
            ));
        };
        debug_assert!(!self.slots[i].reserved);
        self.body_scratch.clear();
        // Chat goes to llama-server's own chat endpoint, so the model's
        // chat template applies.
        let cache_prompt = self.cfg.cache_prompt || self.cfg.route.uses_cache();
        let path = match job.chat {
            Some(messages) => {
                crate::body::write_chat_body(&mut self.body_scratch, &job.params, messages, cache_prompt);
                "/v1/chat/completions"
            }
            None => {
                write_completion_body(&mut self.body_scratch, &job.params, job.prompt, cache_prompt);
                "/completion"
            }
        };
        if let Some(id) = id_slot {
            crate::body::append_id_slot(&mut self.body_scratch, id);
        }
        self.remember_prompt(u, id_slot);
        tracing::debug!(server = u, ?id_slot, blocks = self.hashes.len(), "routed");
        let growing = match job.chat {
            None if !self.hashes.is_empty() => {
                crate::prefix::Growing::start(job.prompt.as_bytes(), &self.hashes, id_slot)
            }
            // Chat: the answer comes back inside the next request's JSON.
            _ => crate::prefix::Growing::default(),
        };
        let slot = &mut self.slots[i];
        slot.reserved = true;
        slot.id_slot = id_slot;
        slot.growing = growing;
        slot.text.clear();
        let work = Work {
            id: job.id,
            // `launch` sets both from the connection it gets.
            phase: Phase::AwaitHead,
            flow: Flow::Flowing,
            attempt: Attempt::Committed,
            delivered: 0,
            retries: 0,
            tried: 0,
            completion: job.chat.is_none(),
            session: self.session_hash,
            max_tokens: job.params.max_tokens,
            folded_bytes: 0,
            folded_tokens: 0,
            text_over: false,
            echo_skip: 0,
        };
        self.launch(i, pick, path, work, io)
            .map_err(|e| Reject::new(502, format!("llama backend: socket: {e}")))?;
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
            w.flow = Flow::Paused;
            slot.deadline = None;
        }
    }

    fn resume(&mut self, id: WorkId, io: &mut dyn Io) {
        let Some(i) = self.slot_of(id) else { return };
        let slot = &mut self.slots[i];
        let Task::Stream(w) = &mut slot.task else { return };
        if w.flow != Flow::Paused {
            return;
        }
        w.flow = Flow::Flowing;
        slot.deadline = Some(io.now() + self.cfg.idle_token_timeout);
        if matches!(slot.conn, Conn::Ready(_)) {
            // Bytes already received may hold whole events, but there is no
            // sink here: a NOP's completion brings the slot back to
            // `complete`, which processes them and re-arms RECV.
            w.flow = Flow::Woken;
            self.upkeep.woken = true;
            // SAFETY: NOP references no memory.
            unsafe { io.submit(op::tag(i, OpKind::Wake), op::nop()) };
        }
    }

    fn complete(&mut self, tag: u64, result: i32, _flags: u32, io: &mut dyn Io, sink: &mut dyn Sink) {
        self.on_completion(tag, result, io, sink);
    }

    fn poll(&mut self, io: &mut dyn Io, sink: &mut dyn Sink) -> Option<Instant> {
        self.upkeep(io, sink)
    }

    fn stats(&self) -> BackendStats {
        self.backend_stats()
    }

    fn active(&self) -> u64 {
        self.by_id.len() as u64
    }

    fn has_capacity(&self) -> bool {
        self.can_route()
    }
}
