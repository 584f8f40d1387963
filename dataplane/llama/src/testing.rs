//! A small io_uring event loop that drives one [`Backend`] without the
//! server: what tests (and tools) use to run the llama backend against a
//! real or a fake llama-server. It follows the core loop's contract: poll
//! once per turn, wait on the ring until the next deadline, queue the
//! completions and hand them to the backend from the loop.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cnse_backend::{Backend, Delivery, FinishReason, Io, Job, Params, Reject, Sink, WorkId};
use io_uring::{squeue, types, IoUring};

/// Ring entries of the test loop.
const RING_ENTRIES: u32 = 256;
/// Completions handled per turn at most.
const COMPLETIONS_PER_TURN_MAX: usize = 1024;

/// The ring side of the loop: what the backend sees as [`Io`].
pub struct RingIo {
    ring: IoUring,
    now: Instant,
}

impl Io for RingIo {
    fn now(&self) -> Instant {
        self.now
    }

    unsafe fn submit(&mut self, tag: u64, entry: squeue::Entry) {
        let entry = entry.user_data(tag);
        loop {
            // SAFETY: the caller guarantees what the entry points to stays
            // valid until its completion (the trait's contract).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Full submission queue: hand it to the kernel and retry.
            if let Err(e) = self.ring.submit() {
                assert!(e.raw_os_error() == Some(libc::EBUSY), "io_uring submit: {e}");
            }
        }
    }
}

/// The test loop.
pub struct Driver {
    io: RingIo,
    completions: Vec<(u64, i32, u32)>,
}

impl Driver {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            io: RingIo {
                ring: IoUring::new(RING_ENTRIES)?,
                now: Instant::now(),
            },
            completions: Vec::with_capacity(COMPLETIONS_PER_TURN_MAX),
        })
    }

    pub fn now(&self) -> Instant {
        self.io.now
    }

    /// Starts work `id` (arrival time: now).
    pub fn start(&mut self, backend: &mut dyn Backend, id: u64, params: Params, prompt: &str) -> Result<(), Reject> {
        self.io.now = Instant::now();
        let job = Job {
            id: WorkId(id),
            params,
            prompt,
            arrived: self.io.now,
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
        let ts = types::Timespec::new().sec(wait.as_secs()).nsec(wait.subsec_nanos());
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.io.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
            Err(e) => panic!("io_uring wait: {e}"),
        }
        self.completions.clear();
        for cqe in self.io.ring.completion().take(COMPLETIONS_PER_TURN_MAX) {
            self.completions.push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
        self.io.now = Instant::now();
        for k in 0..self.completions.len() {
            let (tag, res, flags) = self.completions[k];
            backend.complete(tag, res, flags, &mut self.io, sink);
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
