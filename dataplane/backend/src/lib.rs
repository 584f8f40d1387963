//! The hand-off between the data plane and whatever generates tokens.
//!
//! A backend is a per-core state machine driven by the core's event loop: it
//! never blocks and never owns a thread. The loop calls [`Backend::start`]
//! for admitted work, [`Backend::cancel`] / [`Backend::pause`] /
//! [`Backend::resume`] as the client's stream demands, hands back the
//! completions of the ring operations the backend submitted through
//! [`Io::submit`] ([`Backend::complete`]), and calls [`Backend::poll`] once
//! per loop turn so time-driven work (a model of a given speed, health
//! checks, timeouts) runs; `poll` returns the next instant it needs to run
//! again, which the loop folds into its ring wait (timers on the ring, no
//! sleeping threads).
//!
//! Output goes through a [`Sink`], one call per batch of tokens. The server's
//! sink writes TOKENS frames within the stream's credit; the same trait is
//! what a work-stealing scheduler implements to carry a stolen job's tokens
//! back to the core that owns the client connection.

use std::time::{Duration, Instant};

pub use cnse_proto::{FinishReason, Params};

pub mod synthetic;
pub mod sys;

/// Names one unit of work (one client stream) within a core. Opaque to the
/// backend; the loop packs a slot index and a generation into it so that a
/// late event for a reused slot is recognised and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkId(pub u64);

/// Work handed to a backend.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    pub id: WorkId,
    pub params: Params,
    pub prompt: &'a str,
    /// When the REQUEST arrived (TTFT is measured from here).
    pub arrived: Instant,
    /// A chat request's messages as a JSON array (the HTTP front's
    /// `/v1/chat/completions`). A backend with a chat endpoint of its own
    /// sends these, so the model's chat template applies; others generate
    /// from `prompt`, which holds the messages through the front's template.
    pub chat: Option<&'a str>,
    /// The request's session key (docs/PROTOCOL.md, "Session keys"; HTTP
    /// `X-Session-Id`): a backend with several model servers pins the
    /// conversation to one (the llama backend's `--llama-route session`);
    /// the synthetic backend ignores it.
    pub session: Option<&'a str>,
}

/// Why a backend refused a job at `start`; becomes an ERROR on the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Reject {
    pub code: u32,
    pub message: String,
}

impl Reject {
    pub fn new(code: u32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// What the sink did with delivered tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Taken; keep going.
    Accepted,
    /// Taken, but the stream's bounded buffer is now full: stop producing
    /// for this work until [`Backend::resume`].
    Pause,
    /// The stream no longer exists (cancelled, connection closed): drop the
    /// work and free what it holds. No `end` is expected.
    Gone,
}

/// Where a backend's output goes.
pub trait Sink {
    /// One token whose text is `text` (possibly empty, e.g. when the model
    /// emitted part of a multi-byte character that a later token completes).
    /// Credit counts tokens, so the server must know every token boundary:
    /// a backend that receives several tokens at once calls this once per
    /// token.
    fn token(&mut self, id: WorkId, text: &[u8]) -> Delivery;
    /// Several tokens of one work at once: token i's text is the next
    /// `lens[i]` bytes of `text`. Returns how many were taken and what
    /// became of the last: all with `Accepted`; the first `n` with `Pause`
    /// (the n-th filled the stream's buffer: produce the rest after
    /// [`Backend::resume`]); `Gone` as for [`Sink::token`]. One call costs
    /// one lookup of the stream however many tokens it carries; the
    /// default makes one [`Sink::token`] call per token.
    fn tokens(&mut self, id: WorkId, text: &[u8], lens: &[u32]) -> (usize, Delivery) {
        one_by_one(text, lens, |word| self.token(id, word))
    }
    /// The work's prompt tokens as the model counted them (usage reports
    /// it), when the backend learns it; called before `end`. Without it the
    /// server reports its own count.
    fn prompt_tokens(&mut self, id: WorkId, n: u64) {
        let _ = (id, n);
    }
    /// The work's backend failed after tokens were delivered and the work
    /// continues on another model server from its text so far (issue 14
    /// failover); called at the seam, before the continuation's first
    /// token. The server marks the stream's END for clients that asked.
    fn failed_over(&mut self, id: WorkId) {
        let _ = id;
    }
    /// Normal end of the work.
    fn end(&mut self, id: WorkId, reason: FinishReason);
    /// The work failed (502 backend failed, 504 timed out, ...). Ends it.
    fn error(&mut self, id: WorkId, code: u32, message: &str);
}

/// [`Sink::tokens`] as one `token` call per token: `token` gets each
/// token's text in order until one is refused.
pub fn one_by_one(text: &[u8], lens: &[u32], mut token: impl FnMut(&[u8]) -> Delivery) -> (usize, Delivery) {
    let mut at = 0;
    for (i, &n) in lens.iter().enumerate() {
        let word = &text[at..at + n as usize];
        at += n as usize;
        match token(word) {
            Delivery::Accepted => {}
            Delivery::Pause => return (i + 1, Delivery::Pause),
            Delivery::Gone => return (i, Delivery::Gone),
        }
    }
    (lens.len(), Delivery::Accepted)
}

/// What a backend may ask of the core's event loop.
pub trait Io {
    /// Time of the current loop turn (cached; monotonic).
    fn now(&self) -> Instant;

    /// Queues one io_uring operation. Its completion is delivered to
    /// [`Backend::complete`] with the same `tag` (the loop rewrites the
    /// entry's user_data to route it; tags are the backend's own, 56 bits).
    ///
    /// # Safety
    /// Every buffer, file descriptor and struct the entry points to must stay
    /// valid and unmoved until the completion carrying `tag` (the last one,
    /// for multishot operations) has been delivered, even if the work is
    /// cancelled meanwhile: the kernel owns in-flight memory.
    unsafe fn submit(&mut self, tag: u64, entry: io_uring::squeue::Entry);
}

/// What a gateway backend counts beyond requests, in the order of
/// [`BackendStats::events`], with their help text (`/metrics` exports them
/// as `cnse_backend_events_total{event="NAME"}`); an embedded backend
/// counts none.
pub const EVENTS: [(&str, &str); 13] = [
    ("reused", "request sent on a kept-alive connection"),
    (
        "retried",
        "request sent again on a fresh connection (its pooled one was closed)",
    ),
    (
        "retried_elsewhere",
        "stream sent to another server before its first token",
    ),
    (
        "prefix_routed",
        "stream routed to the server with the longest cached prefix",
    ),
    ("evicted", "server taken out of rotation"),
    ("readmitted", "server put back in rotation by a health check"),
    ("health_checks", "health check sent"),
    ("timeouts", "connect, first-token or idle-token timeout"),
    ("spares_opened", "connection opened ahead of requests"),
    ("spares_taken", "request that found a connection opened ahead"),
    ("idle_closed", "idle connection the server closed while it waited"),
    (
        "failed_over",
        "stream continued on another server after its server failed mid-stream",
    ),
    (
        "session_routed",
        "stream with a session key sent to the server its key is pinned to",
    ),
];

/// Counters a backend exposes for stats and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Work started and not yet ended, cancelled or failed.
    pub active: u64,
    /// Work currently paused for lack of client credit.
    pub paused: u64,
    pub started: u64,
    pub cancelled: u64,
    pub failed: u64,
    /// Model servers behind this backend, and how many of them are in
    /// rotation (healthy); an embedded backend is one, always up.
    pub servers: u64,
    pub servers_up: u64,
    /// Connections held open ahead of requests, over the whole process.
    pub spares: u64,
    /// This core's counts of [`EVENTS`].
    pub events: [u64; EVENTS.len()],
}

/// A per-core token generator. See the crate docs for the calling contract.
pub trait Backend {
    /// Short name for logs and HELLO_ACK.
    fn name(&self) -> &str;

    /// Begins work. On `Err` nothing was started and the stream gets the
    /// reject's ERROR.
    fn start(&mut self, job: Job<'_>, io: &mut dyn Io) -> Result<(), Reject>;

    /// Stops work and frees everything it holds (including backend-side
    /// state such as an HTTP stream). No further sink calls for `id`.
    fn cancel(&mut self, id: WorkId, io: &mut dyn Io);

    /// The stream's buffer is full; produce nothing more for `id` until
    /// `resume`.
    fn pause(&mut self, id: WorkId);

    /// The client granted credit again.
    fn resume(&mut self, id: WorkId, io: &mut dyn Io);

    /// Completion of an operation submitted with `tag`.
    fn complete(&mut self, tag: u64, result: i32, flags: u32, io: &mut dyn Io, sink: &mut dyn Sink);

    /// Runs time-driven work due at `io.now()`; returns the next instant at
    /// which it must be polled again, or `None` when nothing is scheduled.
    fn poll(&mut self, io: &mut dyn Io, sink: &mut dyn Sink) -> Option<Instant>;

    fn stats(&self) -> BackendStats;

    /// Work held now: `stats().active`, which the loop reads every turn
    /// (a backend whose `stats` walks its tables answers this directly).
    fn active(&self) -> u64 {
        self.stats().active
    }

    /// Accepts more work right now (false makes the loop keep requests in its
    /// bounded admission queue).
    fn has_capacity(&self) -> bool {
        true
    }
}

/// Builds one backend per core (backends are not shared between threads).
pub trait BackendFactory: Send + Sync {
    fn build(&self, core: usize) -> Result<Box<dyn Backend>, String>;
}

/// Converts a delay to whole microseconds for reporting.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
