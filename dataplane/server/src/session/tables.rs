//! Connections, streams and what must be flushed: everything the backend's
//! sink touches, split from the backend itself so both can be borrowed at
//! once. Every table is preallocated and bounded by a `Config` limit.

use std::sync::Arc;
use std::time::Instant;

use cnse_backend::{Delivery, FinishReason, Sink, WorkId};

use crate::conn::Conn;
use crate::stages::StageTimes;
use crate::stream::{Phase, Stream};
use crate::Config;

/// Counters of one worker's session.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub streams_open: u64,
    pub conns_open: u64,
    pub tokens_sent: u64,
    pub tokens_produced: u64,
    pub frames_out: u64,
    pub frames_in: u64,
    pub requests: u64,
    pub violations: u64,
    pub rejected: u64,
    pub accepted: u64,
    /// Requests this core's backend ran for its own streams.
    pub ran_local: u64,
    /// Tasks of other cores this core ran (stolen in).
    pub stolen_in: u64,
    /// Tasks of this core that other cores ran (stolen out).
    pub stolen_out: u64,
}

pub(crate) struct Tables {
    pub cfg: Arc<Config>,
    pub now: Instant,
    /// `now` in whole microseconds since `epoch` (the session's start):
    /// one clock subtraction a turn, so that a stream's timings are
    /// integer differences (an `Instant` subtraction, its checks and its
    /// 128-bit microseconds were a tenth of a stream's flush).
    pub now_us: u64,
    pub epoch: Instant,
    pub conns: Vec<Conn>,
    pub conn_free: Vec<u32>,
    /// Slots in use (not `Free`), in no order; `Conn::live_pos` is each
    /// one's index here. Timeouts and shutdown walk this, not the table:
    /// their cost follows the connections open, not the table's size.
    pub conn_live: Vec<u32>,
    pub streams: Vec<Stream>,
    pub stream_free: Vec<u32>,
    pub dirty: Vec<u32>,
    pub n: Counters,
    /// Request-driven bytes held now (prompts, connection buffers), against
    /// `cfg.memory_budget_bytes`.
    pub mem_held: usize,
    /// With `cfg.stage_timing`.
    pub stages: Option<Box<StageTimes>>,
    /// The HTTP front's reused buffers: a response body or event being
    /// built, and a request's prompt (chat template applied).
    pub http_scratch: Vec<u8>,
    pub http_prompt: String,
    /// HTTP responses started by this worker, and the worker's index.
    pub http_ids: u64,
    pub worker: usize,
    /// Request metrics for `GET /metrics` (crate::metrics).
    pub metrics: crate::metrics::RequestMetrics,
    /// Work this core runs for other cores' streams.
    pub foreign: super::foreign::Foreign,
}

/// Capacity a stream's prompt keeps between requests.
const PROMPT_KEEP_BYTES: usize = 4 * 1024;
/// Staging a connection's decoder keeps between frames.
pub(crate) const STAGING_KEEP_BYTES: usize = 64 * 1024;

pub(crate) fn work_id(slot: u32, gen: u32) -> WorkId {
    WorkId((u64::from(gen) << 32) | u64::from(slot))
}

impl Tables {
    pub fn new(cfg: Arc<Config>, now: Instant, conns_max: usize, worker: usize) -> Tables {
        let conns = (0..conns_max).map(|_| Conn::new(now, cfg.payload_bytes_max)).collect();
        let conn_free = (0..conns_max as u32).rev().collect();
        let conn_live = Vec::with_capacity(conns_max);
        let streams = (0..cfg.streams_per_thread_max)
            .map(|_| Stream::new(now, 0, 0))
            .collect();
        let stream_free = (0..cfg.streams_per_thread_max as u32).rev().collect();
        let stages = cfg.stage_timing.then(|| Box::new(StageTimes::new(worker, conns_max)));
        Tables {
            stages,
            http_scratch: Vec::new(),
            http_prompt: String::new(),
            http_ids: 0,
            worker,
            metrics: Default::default(),
            foreign: Default::default(),
            cfg,
            now,
            now_us: 0,
            epoch: now,
            conns,
            conn_free,
            conn_live,
            streams,
            stream_free,
            dirty: Vec::with_capacity(1024),
            n: Counters::default(),
            mem_held: 0,
        }
    }

    /// Takes a free connection slot, if any, into the live list.
    pub fn take_conn(&mut self) -> Option<u32> {
        let slot = self.conn_free.pop()?;
        self.conns[slot as usize].live_pos = self.conn_live.len() as u32;
        self.conn_live.push(slot);
        Some(slot)
    }

    /// Gives a released connection slot back.
    pub fn put_conn(&mut self, slot: u32) {
        let pos = self.conns[slot as usize].live_pos as usize;
        debug_assert_eq!(self.conn_live[pos], slot);
        self.conn_live.swap_remove(pos);
        if let Some(&moved) = self.conn_live.get(pos) {
            self.conns[moved as usize].live_pos = pos as u32;
        }
        self.conn_free.push(slot);
    }

    pub fn mark_dirty(&mut self, conn: u32) {
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
    pub fn fail(&mut self, slot: u32, code: u32, message: &str) {
        let s = &mut self.streams[slot as usize];
        s.phase = Phase::Failed;
        s.error_code = code;
        s.error_message.clear();
        s.error_message.push_str(message);
        let conn = s.conn;
        self.mark_dirty(conn);
    }

    /// Bytes of the memory budget left.
    pub fn mem_left(&self) -> usize {
        self.cfg.memory_budget_bytes.saturating_sub(self.mem_held)
    }

    /// Counts a connection's buffers anew, giving back capacity above the
    /// steady sizes where a buffer is empty.
    pub fn account_conn(&mut self, slot: u32) {
        let out_keep = 2 * self.cfg.send_buffer_bytes;
        let c = &mut self.conns[slot as usize];
        if c.out_fill.is_empty() && c.out_fill.capacity() > out_keep {
            c.out_fill = Vec::new();
        }
        // Never while the kernel may read it (a send in flight).
        if c.send == crate::conn::SendOp::Idle && c.out_flight.is_empty() && c.out_flight.capacity() > out_keep {
            c.out_flight = Vec::new();
        }
        if c.backlog.is_empty() && c.backlog.capacity() > crate::conn::BACKLOG_BYTES_MAX {
            c.backlog = Vec::new();
        }
        c.decoder.shrink_staging(STAGING_KEEP_BYTES);
        if c.http.inbuf.is_empty() && c.http.inbuf.capacity() > STAGING_KEEP_BYTES {
            c.http.inbuf = Vec::new();
        }
        if c.http.body.capacity() > STAGING_KEEP_BYTES {
            c.http.body = Vec::new();
        }
        let now = c.buffer_bytes();
        self.mem_held = self.mem_held - c.held_bytes + now;
        c.held_bytes = now;
    }

    pub fn free_stream(&mut self, slot: u32) {
        let s = &mut self.streams[slot as usize];
        debug_assert!(s.phase != Phase::Free);
        s.phase = Phase::Free;
        s.gen = s.gen.wrapping_add(1);
        s.queue.clear();
        s.paused = false;
        s.http.text.clear();
        if s.http.text.capacity() > PROMPT_KEEP_BYTES {
            s.http.text = Vec::new();
        }
        // Buffers still away with a task are not coming back to this slot.
        self.mem_held -= s.prompt.capacity() + s.http.messages.capacity() + s.away;
        s.away = 0;
        s.remote = None;
        if s.prompt.capacity() > PROMPT_KEEP_BYTES {
            s.prompt = String::new();
        }
        s.http.messages.clear();
        if s.http.messages.capacity() > PROMPT_KEEP_BYTES {
            s.http.messages = String::new();
        }
        s.http.chat = false;
        self.mem_held += s.prompt.capacity() + s.http.messages.capacity();
        self.stream_free.push(slot);
        self.n.streams_open -= 1;
    }

    /// Frames a run of `n` tokens (`text`) of running stream `sslot` straight
    /// into its connection's output, as the flush would frame it from the
    /// stream's queue, when nothing stops that now: nothing queued before
    /// it, credit for all of it, room in the filling send buffer below its
    /// soft size and its frame cap, and a binary-protocol connection (the
    /// HTTP front orders whole responses in its flush). False (nothing
    /// done) otherwise: the run goes to the queue.
    fn frame_now(&mut self, sslot: usize, text: &[u8], n: usize) -> bool {
        let s = &mut self.streams[sslot];
        let c = &mut self.conns[s.conn as usize];
        if c.proto != crate::conn::Proto::Binary || c.state != crate::conn::ConnState::Open {
            return false;
        }
        let cap = self.cfg.frames_per_send_max;
        let fits = c.out_fill.len() + cnse_proto::HEADER_BYTES + text.len() + super::flush::REPLY_SLACK_BYTES
            <= self.cfg.send_buffer_bytes;
        if s.queue.tokens() != 0
            || s.credit.available() < n as u64
            || !fits
            || (cap != 0 && c.fill_frames as usize >= cap)
        {
            return false;
        }
        let n = n as u32;
        cnse_proto::put_tokens(&mut c.out_fill, s.client_id, n, s.sent, text);
        super::flush::tokens_framed(s, &mut c.fill_frames, n, self.now_us, &mut self.metrics, &mut self.n);
        self.n.tokens_produced += u64::from(n);
        let conn = s.conn;
        self.mark_dirty(conn);
        true
    }
}

impl Sink for Tables {
    fn token(&mut self, id: WorkId, text: &[u8]) -> Delivery {
        if super::foreign::is_foreign(id) {
            return self.foreign.token(id, text);
        }
        let (tokens_max, bytes_max) = (self.cfg.stream_buffered_tokens_max, self.cfg.stream_buffered_bytes_max);
        let timed = self.stages.is_some();
        let Some(s) = self.live_stream(id) else {
            return Delivery::Gone;
        };
        if timed && s.produced.is_none() {
            s.produced = Some(Instant::now());
        }
        s.queue.push(text);
        let full = s.queue.tokens() >= tokens_max || s.queue.bytes() >= bytes_max;
        if full {
            s.paused = true;
        }
        let conn = s.conn;
        self.n.tokens_produced += 1;
        self.mark_dirty(conn);
        if full {
            Delivery::Pause
        } else {
            Delivery::Accepted
        }
    }

    fn tokens(&mut self, id: WorkId, text: &[u8], lens: &[u32]) -> (usize, Delivery) {
        if super::foreign::is_foreign(id) {
            // One at a time: the window's park check is per token.
            return cnse_backend::one_by_one(text, lens, |word| self.foreign.token(id, word));
        }
        let (tokens_max, bytes_max) = (self.cfg.stream_buffered_tokens_max, self.cfg.stream_buffered_bytes_max);
        let timed = self.stages.is_some();
        let Some(s) = self.live_stream(id) else {
            return (0, Delivery::Gone);
        };
        if lens.is_empty() {
            return (0, Delivery::Accepted);
        }
        if timed && s.produced.is_none() {
            s.produced = Some(Instant::now());
        }
        let sslot = (id.0 & 0xffff_ffff) as usize;
        if self.frame_now(sslot, text, lens.len()) {
            return (lens.len(), Delivery::Accepted);
        }
        let s = &mut self.streams[sslot];
        // As many as `token` would take one by one: up to the one that
        // fills the buffer (all of them when the whole run leaves room).
        let (mut queued, mut bytes) = (s.queue.tokens(), s.queue.bytes());
        let (mut n, mut len, mut full) = (lens.len(), text.len(), false);
        if queued + n >= tokens_max || bytes + len >= bytes_max {
            (n, len) = (0, 0);
            for &l in lens {
                n += 1;
                len += l as usize;
                queued += 1;
                bytes += l as usize;
                if queued >= tokens_max || bytes >= bytes_max {
                    full = true;
                    break;
                }
            }
        }
        s.queue.push_run(&text[..len], &lens[..n]);
        s.paused |= full;
        let conn = s.conn;
        self.n.tokens_produced += n as u64;
        self.mark_dirty(conn);
        (n, if full { Delivery::Pause } else { Delivery::Accepted })
    }

    fn prompt_tokens(&mut self, id: WorkId, n: u64) {
        // Work run here for another core or rank: its owner counts with
        // its own front (the count does not travel with the tokens yet).
        if super::foreign::is_foreign(id) {
            return;
        }
        if let Some(s) = self.live_stream(id) {
            s.http.prompt_tokens = n;
        }
    }

    fn failed_over(&mut self, id: WorkId) {
        if super::foreign::is_foreign(id) {
            return self.foreign.failed_over(id);
        }
        if let Some(s) = self.live_stream(id) {
            s.failed_over = true;
        }
    }

    fn end(&mut self, id: WorkId, reason: FinishReason) {
        if super::foreign::is_foreign(id) {
            return self.foreign.finished(id, reason);
        }
        if let Some(s) = self.live_stream(id) {
            s.phase = Phase::Finished(reason);
            let conn = s.conn;
            self.mark_dirty(conn);
        }
    }

    fn error(&mut self, id: WorkId, code: u32, message: &str) {
        if super::foreign::is_foreign(id) {
            let end = crate::tasks::TaskEnd::Error {
                code,
                message: message.to_string(),
            };
            return self.foreign.end(id, end);
        }
        if self.live_stream(id).is_some() {
            self.fail((id.0 & 0xffff_ffff) as u32, code, message);
        }
    }
}
