//! A small io_uring event loop that drives one [`Backend`] without the
//! server: what tests (and tools) use to run the llama backend against a
//! real or a fake llama-server. It follows the core loop's contract: poll
//! once per turn, wait on the ring until the next deadline, queue the
//! completions and hand them to the backend from the loop.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cnse_backend::{Backend, Delivery, FinishReason, Io, Job, Params, Reject, Sink, WorkId};
use cnse_ring::{squeue, Completion, Ring, RingConfig, RingError, Tag};

/// Ring entries of the test loop.
const RING_ENTRIES: u32 = 256;
/// Completion queue entries per submission queue entry.
const CQ_FACTOR: u32 = 4;

cnse_ring::op_kinds! {
    /// The test loop's only op kind: the backend's own ops, under a wide tag
    /// carrying the backend's 56-bit tag.
    enum Op { Backend = 1 }
}

/// The ring side of the loop: what the backend sees as [`Io`].
pub struct RingIo {
    ring: Ring,
    now: Instant,
}

impl Io for RingIo {
    fn now(&self) -> Instant {
        self.now
    }

    unsafe fn submit(&mut self, tag: u64, entry: squeue::Entry) {
        assert!(tag <= cnse_ring::WIDE_MAX, "backend tag above 56 bits");
        // SAFETY: the caller guarantees what the entry points to stays valid
        // until its completion (the trait's contract is `Ring::push`'s).
        if let Err(e) = unsafe { self.ring.push(entry, Tag::wide(Op::Backend.code(), tag)) } {
            // Only a kernel failure (ENOMEM, EFAULT) gets here: the
            // full-queue path is inside `Ring::push`, and this is a test tool.
            panic!("test ring refused a submission: {e}");
        }
    }
}

/// The test loop. Dropping it drains the ring (`Ring`'s drop cancels what
/// is in flight); the backend keeps its buffers alive until then, or leaks
/// them.
pub struct Driver {
    io: RingIo,
    completions: Vec<Completion>,
}

impl Driver {
    pub fn new() -> Result<Self, RingError> {
        let ring = Ring::new(RingConfig {
            entries: RING_ENTRIES,
            cq_factor: CQ_FACTOR,
            single_issuer: true,
            ..RingConfig::default()
        })?;
        Ok(Self {
            io: RingIo {
                ring,
                now: Instant::now(),
            },
            completions: Vec::with_capacity((RING_ENTRIES * CQ_FACTOR) as usize),
        })
    }

    pub fn now(&self) -> Instant {
        self.io.now
    }

    /// Starts work `id` (arrival time: now).
    pub fn start(&mut self, backend: &mut dyn Backend, id: u64, params: Params, prompt: &str) -> Result<(), Reject> {
        self.start_keyed(backend, id, params, prompt, None)
    }

    /// Starts work `id` carrying a session key (`Job::session`).
    pub fn start_keyed(
        &mut self,
        backend: &mut dyn Backend,
        id: u64,
        params: Params,
        prompt: &str,
        session: Option<&str>,
    ) -> Result<(), Reject> {
        self.io.now = Instant::now();
        let job = Job {
            id: WorkId(id),
            params,
            prompt,
            arrived: self.io.now,
            chat: None,
            session,
        };
        backend.start(job, &mut self.io)
    }

    pub fn cancel(&mut self, backend: &mut dyn Backend, id: u64) {
        backend.cancel(WorkId(id), &mut self.io);
    }

    pub fn resume(&mut self, backend: &mut dyn Backend, id: u64) {
        backend.resume(WorkId(id), &mut self.io);
    }

    /// One loop turn: poll, wait on the ring at most `max_wait` (or until
    /// the backend's next deadline), deliver the completions.
    pub fn turn(&mut self, backend: &mut dyn Backend, sink: &mut dyn Sink, max_wait: Duration) {
        self.io.now = Instant::now();
        let next = backend.poll(&mut self.io, sink);
        let mut wait = max_wait;
        if let Some(t) = next {
            wait = wait.min(t.saturating_duration_since(self.io.now));
        }
        self.completions.clear();
        if let Err(e) = self.io.ring.turn(Some(wait), &mut self.completions) {
            panic!("test ring: {e}");
        }
        self.io.now = Instant::now();
        for k in 0..self.completions.len() {
            let c = self.completions[k];
            debug_assert_eq!(Op::from_code(c.tag.kind()), Some(Op::Backend));
            backend.complete(c.tag.wide_value(), c.result, c.flags, &mut self.io, sink);
        }
    }

    /// Turns the loop until `done` holds or `timeout` passes; returns
    /// whether `done` held.
    pub fn run_until(
        &mut self,
        backend: &mut dyn Backend,
        sink: &mut Recorder,
        timeout: Duration,
        mut done: impl FnMut(&Recorder) -> bool,
    ) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if done(sink) {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            self.turn(backend, sink, (end - now).min(Duration::from_millis(50)));
        }
    }

    /// Turns the loop for `d` regardless of events.
    pub fn run_for(&mut self, backend: &mut dyn Backend, sink: &mut Recorder, d: Duration) {
        self.run_until(backend, sink, d, |_| false);
    }
}

/// What one stream received.
#[derive(Debug, Default, Clone)]
pub struct Record {
    pub text: Vec<u8>,
    pub tokens: u64,
    pub end: Option<FinishReason>,
    pub error: Option<(u32, String)>,
    pub first_token: Option<Instant>,
    /// Calls after the stream ended (must stay 0).
    pub after_end: u64,
    /// `failed_over` calls, and the tokens received before the first.
    pub failed_over: u32,
    pub tokens_at_failover: Option<u64>,
}

impl Record {
    pub fn finished(&self) -> bool {
        self.end.is_some() || self.error.is_some()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.text).into_owned()
    }
}

/// A sink that records everything, with an optional per-stream token credit
/// (answers [`Delivery::Pause`] once a stream has used it up) and streams
/// that are gone.
#[derive(Debug, Default)]
pub struct Recorder {
    pub streams: HashMap<WorkId, Record>,
    pub credit: HashMap<WorkId, u64>,
    pub gone: Vec<WorkId>,
}

impl Recorder {
    pub fn get(&self, id: u64) -> Record {
        self.streams.get(&WorkId(id)).cloned().unwrap_or_default()
    }

    pub fn finished(&self, id: u64) -> bool {
        self.streams.get(&WorkId(id)).is_some_and(Record::finished)
    }

    pub fn all_finished(&self, ids: impl IntoIterator<Item = u64>) -> bool {
        ids.into_iter().all(|id| self.finished(id))
    }
}

impl Sink for Recorder {
    fn token(&mut self, id: WorkId, text: &[u8]) -> Delivery {
        if self.gone.contains(&id) {
            return Delivery::Gone;
        }
        let r = self.streams.entry(id).or_default();
        if r.finished() {
            r.after_end += 1;
        }
        r.text.extend_from_slice(text);
        r.tokens += 1;
        r.first_token.get_or_insert_with(Instant::now);
        match self.credit.get(&id) {
            Some(&c) if r.tokens >= c => Delivery::Pause,
            _ => Delivery::Accepted,
        }
    }

    fn failed_over(&mut self, id: WorkId) {
        let r = self.streams.entry(id).or_default();
        if r.finished() {
            r.after_end += 1;
        }
        r.failed_over += 1;
        r.tokens_at_failover.get_or_insert(r.tokens);
    }

    fn end(&mut self, id: WorkId, reason: FinishReason) {
        let r = self.streams.entry(id).or_default();
        if r.finished() {
            r.after_end += 1;
        }
        r.end = Some(reason);
    }

    fn error(&mut self, id: WorkId, code: u32, message: &str) {
        let r = self.streams.entry(id).or_default();
        if r.finished() {
            r.after_end += 1;
        }
        r.error = Some((code, message.to_string()));
    }
}
